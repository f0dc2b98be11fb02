"""Runtime guards for remote code: what it may read, call, write and import.

    guards = Guards(model)                  # once per worker, after the model is loaded
    scope = guards.scope(print_fn)          # fresh globals for one job

Attribute access is allowed only on an allow-list of value types. Tensors that
share storage with the model's parameters or buffers are read-only: no item or
attribute writes, no in-place methods, no ``.data``, no hooks.
"""

from __future__ import annotations

import builtins
import inspect
import weakref
import math
import operator

import torch
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence

from ..remote.serialize import Namespace
from ..remote.wire import SANDBOX_BUILTINS
from ..tracing.envoy import Envoy
from ..tracing.source import CalledSourceAccessor, OperationEnvoy, SourceAccessor
from ..tracing.values import ValueAccess
from .errors import SandboxError
from .policy import ALLOWED_IMPORTS, is_reserved

# -- torch surface ------------------------------------------------------------

_TORCH_DENY = frozenset(
    {
        "load", "save", "hub", "utils", "ops", "jit", "compile", "distributed", "multiprocessing",
        "cuda", "backends", "library", "package", "onnx", "export", "fx", "profiler", "overrides",
        "classes", "serialization", "from_file", "frombuffer", "from_numpy", "from_dlpack", "testing",
        "compiler", "futures", "monitor", "mps", "xpu", "mtia", "cpu", "quantization", "ao", "amp",
        "empty", "empty_like", "empty_strided", "empty_permuted", "random", "Generator", "func",
        "use_deterministic_algorithms", "autocast", "storage", "nested", "masked", "sparse",
        "Storage", "UntypedStorage", "TypedStorage", "typename", "is_storage", "get_file_path",
        "vmap", "cond", "while_loop", "library", "device_mesh", "xla", "fork", "wait", "signal",
        "accelerator", "inductor", "hpu", "npu", "export", "Tensor",
    }
)
_TORCH_DENY_PREFIXES = ("set_", "get_", "get_rng", "manual_seed", "seed", "initial_seed", "is_grad", "has_", "handle_", "sym_", "Sym")
_TORCH_FUNCTION_MODULES = frozenset(
    {"torch", "torch.functional", "torch.nn.functional", "torch._C._linalg", "torch._C._fft", "torch._C._special",
     "torch._C._nn", "torch.autograd"}
)
_TORCH_CLASSES = {"Size", "device", "dtype", "finfo", "iinfo", "no_grad", "enable_grad", "inference_mode"}
_SUBMODULES = {
    "torch": {"nn": "torch.nn", "linalg": "torch.linalg", "fft": "torch.fft", "special": "torch.special", "autograd": "torch.autograd"},
    "torch.nn": {"functional": "torch.nn.functional"},
}
# torch.nn classes remote code may use and subclass (its own modules: an SAE, a probe)
_NN_CLASSES = frozenset(
    {"Module", "Linear", "Parameter", "ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "Softmax", "Sequential",
     "ModuleList", "ModuleDict", "ParameterList", "LayerNorm", "Embedding", "Dropout", "Identity"}
)
_ONLY = {"torch.nn": {"functional"} | _NN_CLASSES, "torch.autograd": {"grad"}}

_TENSOR_DENY = frozenset(
    {
        "storage", "untyped_storage", "numpy", "share_memory_", "set_", "data_ptr", "new", "new_empty",
        "new_empty_strided", "resize_", "resize_as_", "module_load", "pin_memory", "is_shared",
        "storage_type", "to_dlpack", "tolist_", "untyped_storage", "apply_", "map_", "map2_",
    }
)
_TENSOR_SHARED_DENY = frozenset(
    {"data", "register_hook", "register_post_accumulate_grad_hook", "retain_grad", "requires_grad_", "detach_"}
)


class _TensorTypeMeta(type):
    def __instancecheck__(cls, value):
        return isinstance(value, torch.Tensor)

    def __subclasscheck__(cls, sub):
        return isinstance(sub, type) and issubclass(sub, torch.Tensor)

    # An annotation `torch.Tensor` evaluated in remote code equals the client's `torch.Tensor`.
    def __eq__(cls, other):
        return cls is other or other is torch.Tensor

    def __hash__(cls):
        return hash(torch.Tensor)


class TensorType(metaclass=_TensorTypeMeta):
    """``torch.Tensor`` for remote code: works with ``isinstance``; build tensors with ``torch.tensor``."""

    def __new__(cls, *args, **kwargs):
        raise SandboxError("torch.Tensor(...) can create uninitialized memory; use torch.tensor(...) or torch.zeros(...)")


def _einops():
    try:
        import einops
    except ImportError:
        return None
    return einops


class ModuleProxy:
    """A read-only view of an allowed module: only its allowed attributes are reachable."""

    __slots__ = ("_proxy_name", "_proxy_module", "_proxy_guards")

    def __init__(self, name, module, guards):
        object.__setattr__(self, "_proxy_name", name)
        object.__setattr__(self, "_proxy_module", module)
        object.__setattr__(self, "_proxy_guards", guards)

    def __getattr__(self, attr):
        return self._proxy_guards.module_attr(self._proxy_name, self._proxy_module, attr)

    def __setattr__(self, attr, value):
        raise SandboxError(f"module {self._proxy_name} is read-only in remote code")

    __delattr__ = __setattr__

    def __repr__(self):
        return f"<module {self._proxy_name!r} (remote sandbox)>"


class EnvoyWriter:
    """What ``_write_(envoy)`` returns: only ``.output``, ``.input`` and ``.inputs`` can be set through it."""

    __slots__ = ("_envoy",)

    def __init__(self, envoy):
        object.__setattr__(self, "_envoy", envoy)

    def __setattr__(self, name, value):
        if name not in ("output", "input", "inputs"):
            _deny(f"setting attributes of {self._envoy._display} is not allowed in remote code "
                  "(assign to .output, .input or .inputs to change values)")
        setattr(self._envoy, name, value)

    def __delattr__(self, name):
        _deny(f"deleting attributes of {self._envoy._display} is not allowed in remote code")


class ConfigView:
    """A copy of the model's config for reading (``model.config.num_hidden_layers``)."""

    def __init__(self, values):
        self.__dict__.update(values)

    def to_dict(self):
        return dict(self.__dict__)

    def __repr__(self):
        return f"ConfigView({self.__dict__!r})"


class TokenizerView:
    """The model's tokenizer for remote code: decoding and encoding only."""

    __slots__ = ("_tok",)
    allowed = frozenset({"decode", "batch_decode", "encode", "convert_ids_to_tokens", "convert_tokens_to_ids",
                         "eos_token_id", "bos_token_id", "pad_token_id", "vocab_size", "eos_token", "bos_token"})

    def __init__(self, tok):
        object.__setattr__(self, "_tok", tok)

    def get(self, name):
        if name not in self.allowed:
            raise SandboxError(f"tokenizer.{name} is not available in remote code (allowed: {', '.join(sorted(self.allowed))})")
        return getattr(self._tok, name)


_ENVOY_API = frozenset(
    {"output", "input", "inputs", "skip", "next", "path", "modules", "named_modules", "children",
     "named_children", "get", "trace", "generate", "scan", "generator", "config", "tokenizer", "padding_side",
     "source"}
)
_TRACER_API = frozenset({"invoke", "stop", "barrier", "iter", "all", "next", "cache", "result"})
def _awaitable_types():
    """The types of coroutines, async generators and the awaitables ``asend``/``athrow`` return."""
    import types

    async def agen():
        yield

    ag = agen()
    asend, athrow = ag.asend(None), ag.athrow(GeneratorExit)
    found = (types.CoroutineType, types.AsyncGeneratorType, type(asend), type(athrow))
    asend.close()
    athrow.close()
    return found


# Driving them by hand (there is no event loop in remote code); never their frames or code.
_AWAITABLES = _awaitable_types()
_AWAITABLE_API = frozenset({"send", "throw", "close", "asend", "athrow", "aclose"})

_PLAIN = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_CONTAINERS = (list, tuple, dict, set, frozenset, range, slice)


def _plain_value(value):
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, tuple):
        return all(_plain_value(v) for v in value)
    return False


def _deny(message):
    raise SandboxError(message)


_INPLACE = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
    ">>=": operator.irshift, "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor,
    "@=": operator.imatmul,
}


class Guards:
    """The guard functions and the globals of a remote job, for one served model."""

    def __init__(self, model):
        from ..tracing.cache import Cache, CacheEntry, CacheView
        from ..tracing.tracer import Barrier, Invoker, StepLoop, Tracer

        self.model = model
        self._tracer_types = (Tracer,)
        self._opaque_types = (Invoker, StepLoop, Barrier)
        self._cache_types = (Cache, CacheView, CacheEntry)
        self._source_types = (SourceAccessor, CalledSourceAccessor)
        try:
            from transformers.utils import ModelOutput
        except ImportError:  # pragma: no cover
            ModelOutput = ()
        self._model_output = ModelOutput
        self.shared = set()
        module = getattr(model, "_module", model)
        for tensor in list(module.parameters()) + list(module.buffers()):
            self.shared.add(self._storage(tensor))
        self.shared.discard(None)
        self.model_modules = frozenset(id(m) for m in module.modules())
        self.user_classes = weakref.WeakSet()  # classes remote code defined (see make_class)
        self._proxies = {}

    # -- classes written in remote code -------------------------------------------

    def make_class(self, name, bases, namespace, **keywords):
        """The metaclass hook of remote ``class`` statements: only allowed bases; the class is recorded."""
        if keywords:
            _deny(f"class {name}: keyword arguments are not allowed")
        for base in bases:
            if not (base in self.user_classes or base in _BASE_CLASSES):
                _deny(f"class {name}: {getattr(base, '__name__', base)!r} cannot be a base class in remote code "
                      f"(allowed: classes defined in remote code, {', '.join(sorted(c.__name__ for c in _BASE_CLASSES))})")
        meta = type
        for base in bases:
            if issubclass(type(base), meta):
                meta = type(base)
        if meta is not type:
            _deny(f"class {name}: metaclass {meta.__name__} is not allowed")
        namespace = dict(namespace)
        # dataclasses resolves string annotations in sys.modules[cls.__module__]; remote code has no module
        namespace["__module__"] = "builtins"
        cls = type(name, bases, namespace)
        self.user_classes.add(cls)
        return cls

    def is_user(self, obj) -> bool:
        """``obj`` is a class remote code defined, or an instance of one."""
        return (isinstance(obj, type) and obj in self.user_classes) or type(obj) in self.user_classes

    def is_own_module(self, obj) -> bool:
        """A torch module remote code created (not a module of the served model)."""
        return isinstance(obj, torch.nn.Module) and id(obj) not in self.model_modules

    # -- tensors ----------------------------------------------------------------

    @staticmethod
    def _storage(tensor):
        """``(device type, storage address)``; None for meta tensors (no storage); raises if unreadable."""
        if tensor.is_meta:
            return None
        return (tensor.device.type, tensor.untyped_storage().data_ptr())

    def is_shared(self, tensor) -> bool:
        """Whether ``tensor`` may share memory with the model's weights (True when that cannot be told)."""
        try:
            key = self._storage(tensor)
        except (RuntimeError, NotImplementedError, TypeError):  # e.g. a tensor subclass without storage
            return True
        return key is not None and key in self.shared

    # -- modules ------------------------------------------------------------------

    def proxy(self, name):
        proxy = self._proxies.get(name)
        if proxy is None:
            if name == "einops":
                module = _einops()
                if module is None:
                    raise SandboxError("einops is not installed on this server")
            elif name == "nnsight":
                import nnsight as module
            else:
                import importlib

                module = importlib.import_module(name)
            proxy = self._proxies[name] = ModuleProxy(name, module, self)
        return proxy

    def module_attr(self, name, module, attr):
        if not isinstance(attr, str) or attr.startswith("_"):
            _deny(f"{name}.{attr} is not available in remote code")
        if name == "math":
            value = getattr(module, attr, None)
            if value is None or inspect.ismodule(value):
                _deny(f"math.{attr} is not available")
            return value
        if name == "nnsight":
            if attr == "save":
                return module.save
            _deny(f"nnsight.{attr} is not available in remote code (only nnsight.save)")
        if name in _PURE_HELPERS:
            if attr in _PURE_HELPERS[name]:
                return getattr(module, attr)
            _deny(f"{name}.{attr} is not available in remote code (allowed: {', '.join(sorted(_PURE_HELPERS[name]))})")
        if name == "einops":
            if attr in ("rearrange", "reduce", "repeat", "einsum", "pack", "unpack"):
                return getattr(module, attr)
            _deny(f"einops.{attr} is not available in remote code")
        only = _ONLY.get(name)
        sub = _SUBMODULES.get(name, {})
        if attr in sub:
            return self.proxy(sub[attr])
        if only is not None and attr not in only:
            _deny(f"{name}.{attr} is not available in remote code (allowed: {', '.join(sorted(only))})")
        if name == "torch" and attr == "Tensor":
            return TensorType
        if (
            attr in _TORCH_DENY
            or attr.endswith("_")
            or attr.startswith(_TORCH_DENY_PREFIXES)
            or "Storage" in attr
            or attr.endswith("Tensor")
            or "sparse" in attr
            or "quantized" in attr
        ):
            _deny(f"{name}.{attr} is not available in remote code (file, network, pickle, JIT, global-state, "
                  "uninitialized-memory and in-place functions of torch are blocked)")
        try:
            value = getattr(module, attr)
        except AttributeError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None
        if inspect.ismodule(value):
            _deny(f"{name}.{attr} is not available in remote code")
        if isinstance(value, type):
            if attr in _TORCH_CLASSES or (name == "torch.nn" and attr in _NN_CLASSES):
                return value
            _deny(f"the class {name}.{attr} is not available in remote code")
        if callable(value):
            if getattr(value, "__module__", None) not in _TORCH_FUNCTION_MODULES:
                _deny(f"{name}.{attr} is not available in remote code")
            if name == "torch.nn.functional":
                return self._functional(attr, value)
            if name == "torch" and not (
                hasattr(torch._C._VariableFunctions, attr) or value.__module__ == "torch.functional" or attr == "is_tensor"
            ):
                _deny(f"torch.{attr} is not available in remote code")
            return value
        if _plain_value(value):
            return value
        _deny(f"{name}.{attr} is not available in remote code")

    def _functional(self, attr, fn):
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return fn
        if "inplace" not in params:
            return fn
        names = list(params)
        guards = self

        def checked(*args, **kwargs):
            inplace = kwargs.get("inplace")
            if inplace is None and len(args) > names.index("inplace"):
                inplace = args[names.index("inplace")]
            if inplace and args and isinstance(args[0], torch.Tensor) and guards.is_shared(args[0]):
                _deny(f"F.{attr}(..., inplace=True) on the model's weights is not allowed")
            return fn(*args, **kwargs)

        checked.__name__ = attr
        return checked

    # -- the guards RestrictedPython calls ----------------------------------------

    def getattr(self, obj, name, *default):
        if not isinstance(name, str):
            _deny(f"attribute {name!r} is not allowed")
        if isinstance(obj, super) and name in ("__init__", "__post_init__"):
            return getattr(obj, name)
        if is_reserved(name):
            _deny(f"attribute {name!r} is not allowed: dunder and reserved attributes are private in remote code")
        if self.is_user(obj) or (isinstance(obj, super) and not name.startswith("_")):
            return getattr(obj, name)
        if name.startswith("_"):
            _deny(f"attribute {name!r} is not allowed: names starting with '_' are private in remote code "
                  "(except on objects of classes defined in remote code)")
        if self.is_own_module(obj):
            return getattr(obj, name)
        if isinstance(obj, ModuleProxy):
            return getattr(obj, name)
        if isinstance(obj, Namespace):
            return obj.get(name)
        if isinstance(obj, torch.Tensor):
            if name in _TENSOR_DENY or "resize" in name or "sparse" in name or "storage" in name:
                _deny(f"tensor.{name} is not available in remote code")
            if (name in _TENSOR_SHARED_DENY or name.endswith("_")) and self.is_shared(obj):
                _deny(f"tensor.{name} on the model's own weights is not allowed: they are read-only for remote code")
            return getattr(obj, name)
        if isinstance(obj, Envoy):
            return self._envoy_attr(obj, name)
        if isinstance(obj, self._source_types):
            return getattr(obj, name)  # an operation by name (names starting with '_' were refused above)
        if isinstance(obj, OperationEnvoy):
            if name in ("output", "input", "inputs", "source", "skip", "next"):
                return getattr(obj, name)
            _deny(f"{obj._display}.{name} is not available in remote code")
        if isinstance(obj, self._tracer_types):
            if name in _TRACER_API:
                return getattr(obj, name)
            _deny(f"tracer.{name} is not available in remote code (allowed: {', '.join(sorted(_TRACER_API))})")
        if isinstance(obj, str):
            if name in ("format", "format_map"):
                _deny(f"str.{name}() can read attributes through its format string; use an f-string")
            return getattr(obj, name)
        if isinstance(obj, _PLAIN) or isinstance(obj, _CONTAINERS):
            return getattr(obj, name)
        if isinstance(obj, (torch.finfo, torch.iinfo)) or type(obj).__module__ == "torch.return_types":
            return getattr(obj, name)
        if isinstance(obj, ConfigView):
            return getattr(obj, name)
        if isinstance(obj, TokenizerView):
            return obj.get(name)
        if isinstance(obj, self._cache_types):
            return getattr(obj, name)
        if self._model_output and isinstance(obj, self._model_output):
            if name in obj.keys() or name in ("keys", "values", "items", "to_tuple", "get"):
                return getattr(obj, name)
            _deny(f"model output has no field {name!r} (fields: {', '.join(obj.keys())})")
        if isinstance(obj, BaseException):
            if name == "args":
                return obj.args
            if name == "value" and isinstance(obj, StopIteration):  # what a finished coroutine returned
                return obj.value
            _deny(f"exception.{name} is not available in remote code (only .args, and StopIteration.value)")
        if isinstance(obj, _AWAITABLES):
            if name in _AWAITABLE_API and hasattr(obj, name):
                return getattr(obj, name)
            _deny(f"{type(obj).__name__}.{name} is not available in remote code (only {', '.join(sorted(_AWAITABLE_API))})")
        if type(obj).__name__ == "GeneratorEnvoy" and name == "output":
            return obj.output
        _deny(f"reading .{name} of a {type(obj).__name__} object is not allowed in remote code")

    def _envoy_attr(self, envoy, name):
        module = envoy._module
        if name in module._modules:
            return getattr(envoy, name)
        if name in _ENVOY_API:
            if name == "config":
                config = getattr(envoy, "config", None)
                if config is None:
                    _deny("this model has no config")
                import copy

                return ConfigView(copy.deepcopy(config.to_dict()))
            if name == "tokenizer":
                tok = getattr(envoy, "tokenizer", None)
                return None if tok is None else TokenizerView(tok)
            if name == "get":
                return self._envoy_get(envoy)
            if name in ("trace", "generate", "scan"):
                fn = getattr(envoy, name)
                return self._no_remote(fn)
            return getattr(envoy, name)
        try:
            value = getattr(module, name)
        except AttributeError:
            if hasattr(type(envoy), name):
                _deny(f"{envoy._display}.{name} is not available in remote code")
            return getattr(envoy, name)  # the envoy's own error listing the children
        if isinstance(value, torch.Tensor) or _plain_value(value):
            return value
        _deny(
            f"{envoy._display}.{name} is not available in remote code: module attributes are readable "
            "when they are tensors or plain values; methods of modules other than calling them are blocked"
        )

    def _envoy_get(self, envoy):
        def get(path):
            if not isinstance(path, str) or any(part.startswith("_") for part in path.split(".")):
                _deny(f"invalid module path {path!r}")
            return envoy.get(path)

        return get

    @staticmethod
    def _no_remote(fn):
        def call(*args, remote=False, blocking=True, **kwargs):
            if remote:
                _deny("remote=True inside remote code is not allowed: the code already runs on the server")
            return fn(*args, **kwargs)

        return call

    def getitem(self, obj, key):
        if isinstance(obj, Envoy) and isinstance(key, str) and any(p.startswith("_") for p in key.split(".")):
            _deny(f"invalid module path {key!r}")
        if isinstance(obj, ModuleProxy):
            _deny("modules cannot be indexed")
        return obj[key]

    def write(self, obj):
        if isinstance(obj, torch.Tensor):
            if self.is_shared(obj):
                _deny("the model's weights are read-only for remote code (write into a copy: w = w.clone())")
            return obj
        if type(obj) in (list, dict, bytearray) or isinstance(obj, ConfigView):
            return obj
        if self.is_user(obj) or self.is_own_module(obj):
            return obj
        if isinstance(obj, ValueAccess):
            return EnvoyWriter(obj)
        _deny(f"changing a {type(obj).__name__} object is not allowed in remote code")

    def check_assign(self, target):
        if isinstance(target, ValueAccess):
            return target
        _deny(f"only a module's .output, .input or .inputs can be assigned (not on a {type(target).__name__})")

    def apply(self, fn, *args, **kwargs):
        for key in kwargs:
            if not isinstance(key, str) or is_reserved(key) or key == "out":
                _deny(f"keyword argument {key!r} is not allowed in remote code")
        return fn(*args, **kwargs)

    def inplacevar(self, op, target, value):
        if isinstance(target, torch.Tensor) and self.is_shared(target):
            _deny("the model's weights are read-only for remote code")
        fn = _INPLACE.get(op)
        if fn is None:
            _deny(f"operator {op} is not supported")
        return fn(target, value)

    def getiter(self, obj):
        if isinstance(obj, ModuleProxy):
            _deny("modules cannot be iterated")
        return iter(obj)

    def hasattr(self, obj, name):
        try:
            self.getattr(obj, name)
        except (AttributeError, SandboxError):
            return False
        return True

    def import_(self, name, globals=None, locals=None, fromlist=(), level=0):
        if level or name not in ALLOWED_IMPORTS:
            _deny(f"import of {name!r} is not allowed; allowed modules: {', '.join(sorted(ALLOWED_IMPORTS))}")
        if fromlist:
            return self.proxy(name)
        return self.proxy(name.split(".")[0])

    # -- the globals of one job -----------------------------------------------------

    def builtins(self, print_fn):
        safe = {name: getattr(builtins, name) for name in SANDBOX_BUILTINS}
        safe.update(
            {
                "print": print_fn,
                "hasattr": self.hasattr,
                "__import__": self.import_,
                # class statements: RestrictedPython gives each one metaclass=__metaclass__ (make_class)
                "__build_class__": builtins.__build_class__,
                "None": None,
                "True": True,
                "False": False,
            }
        )
        return safe

    def scope(self, print_fn):
        from .policy import restricted_compile

        return {
            "__builtins__": self.builtins(print_fn),
            "__name__": "nnsight_remote",
            "_getattr_": self.getattr,
            "_getitem_": self.getitem,
            "_write_": self.write,
            "_getiter_": self.getiter,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_apply_": self.apply,
            "_inplacevar_": self.inplacevar,
            "__nnsight_check_assign__": self.check_assign,
            "__nnsight_locals__": builtins.locals,
            "__nnsight_compile__": restricted_compile,
            "__metaclass__": self.make_class,
            "__nnsight_inplacevar__": self.inplacevar,
        }


# Standard-library helpers that only build functions and classes out of what they are given.
_PURE_HELPERS = {
    "functools": frozenset({"partial", "reduce", "wraps", "cmp_to_key"}),
    "dataclasses": frozenset({"dataclass", "field", "fields", "asdict", "astuple", "replace", "is_dataclass"}),
}

_BASE_CLASSES = frozenset(
    [getattr(torch.nn, n) for n in _NN_CLASSES if n != "Parameter"]
    + [Exception, ValueError, TypeError, RuntimeError, KeyError, IndexError, dict, list, tuple]
)


def make_print(sink, limit):
    """A ``print`` for remote code that sends its text to ``sink`` (at most ``limit`` characters per job)."""
    state = {"left": limit, "warned": False}

    def remote_print(*args, sep=" ", end="\n", file=None, flush=False):
        if file is not None:
            raise SandboxError("print(file=...) is not available in remote code")
        text = str(sep).join(str(a) for a in args) + str(end)
        if state["left"] <= 0:
            if not state["warned"]:
                state["warned"] = True
                sink(f"[nnsight: print output over {limit} characters was cut]\n")
            return
        text = text[: state["left"]]
        state["left"] -= len(text)
        sink(text)

    return remote_print


__all__ = ["Guards", "ModuleProxy", "ConfigView", "TokenizerView", "TensorType", "make_print", "math"]
