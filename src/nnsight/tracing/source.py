"""Operation-level access: ``envoy.source`` names every call inside a module's forward.

    print(model.transformer.h[0].attn.source)          # the forward, each call site named
    with model.trace("Hello"):
        out = model.transformer.h[0].attn.source.attention_interface_0.output.save()
        model.transformer.h[0].attn.source.self_c_proj_0.output[:] = 0

Each call site ``f(...)`` in the forward is named after what it calls
(``self.c_proj(...)`` -> ``self_c_proj``, ``attention_interface(...)`` ->
``attention_interface``), numbered per name in source order. The forward is
rewritten once per module class so each call goes through a small dispatcher;
only modules whose ``.source`` a trace uses run the rewritten forward, and only
during that trace, so every other operation runs at full speed. Operations
support ``.output``, ``.input`` and ``.inputs`` reads and writes like modules.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types

import torch

from .values import ValueAccess
from .errors import NNsightError
from .lru import LRU
from .interleaver import ModuleHook, active_hook, current_mediator

OP = "__nnsight_call__"


def _call_name(func) -> str:
    parts = []
    node = func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
        parts.append("super")
    elif not (isinstance(node, ast.Call) and parts):
        # A method of a call's result is named by the method alone, as nnsight 0.8.1 does:
        # ``self.c_attn(x).split(...)`` -> ``split``; anything else is just a ``call``.
        parts.append("call")
    return "_".join(reversed(parts))


class _Sites(ast.NodeVisitor):
    """Every call in a function body (not in nested functions), in source order."""

    def __init__(self):
        self.calls = []

    def visit_Call(self, node):
        self.calls.append(node)
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        pass

    visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_FunctionDef


class _Rewriter(ast.NodeTransformer):
    def __init__(self, names, self_name):
        self.names = names  # id(call node) -> op name
        self.self_name = self_name

    def visit_Call(self, node):
        name = self.names.get(id(node))
        self.generic_visit(node)
        if name is None:
            return node
        return ast.copy_location(
            ast.Call(
                func=ast.Name(OP, ast.Load()),
                args=[ast.Name(self.self_name, ast.Load()), ast.Constant(name), node.func, *node.args],
                keywords=node.keywords,
            ),
            node,
        )


class SourceInfo:
    """The rewritten forward of one module class and the names of its operations."""

    def __init__(self, target):
        function = inspect.unwrap(target.forward if isinstance(target, type) else target)
        label = f"the forward of {target.__name__}" if isinstance(target, type) else f"{getattr(target, '__qualname__', target)!r}"
        if isinstance(function, types.MethodType):
            function = function.__func__
        try:
            lines, first = inspect.getsourcelines(function)
        except (OSError, TypeError) as error:
            raise NNsightError(f"{label} has no Python source to show ({error})") from None
        self.filename = inspect.getsourcefile(function) or "<unknown>"
        self.first_line = first
        self.lines = lines
        tree = ast.parse(textwrap.dedent("".join(lines)))
        ast.increment_lineno(tree, first - 1)
        fn = tree.body[0]
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise NNsightError(f"{label} is not a plain function")
        fn.decorator_list = []
        sites = _Sites()
        for stmt in fn.body:
            sites.visit(stmt)
        counts: dict[str, int] = {}
        names = {}
        self.operations: dict[str, int] = {}  # op name -> line
        for call in sorted(sites.calls, key=lambda c: (c.lineno, c.col_offset)):
            base = _call_name(call.func)
            index = counts.get(base, 0)
            counts[base] = index + 1
            name = f"{base}_{index}"
            names[id(call)] = name
            self.operations[name] = call.lineno
        self_name = fn.args.args[0].arg if fn.args.args else "self"
        _Rewriter(names, self_name).visit(fn)
        freevars = function.__code__.co_freevars
        factory = ast.FunctionDef(
            name="__nnsight_factory__",
            args=ast.arguments(
                posonlyargs=[], args=[ast.arg(arg=a) for a in (OP, *freevars)], vararg=None, kwonlyargs=[],
                kw_defaults=[], kwarg=None, defaults=[],
            ),
            body=[fn, ast.Return(ast.Name(fn.name, ast.Load()))],
            decorator_list=[],
            returns=None,
        )
        ast.copy_location(factory, fn)
        module = ast.fix_missing_locations(ast.Module(body=[factory], type_ignores=[]))
        namespace = {}
        exec(compile(module, self.filename, "exec"), function.__globals__, namespace)
        self.factory = namespace["__nnsight_factory__"]
        self.cells = [cell.cell_contents for cell in (function.__closure__ or ())]
        self.forward = self.factory(_dispatch, *self.cells)

    def bind(self, dispatch):
        """The rewritten function with its call sites going through ``dispatch`` (an operation's own)."""
        return self.factory(dispatch, *self.cells)

    def listing(self, label):
        by_line: dict[int, list[str]] = {}
        for name, line in self.operations.items():
            by_line.setdefault(line, []).append(name)
        width = max((len(", ".join(v)) for v in by_line.values()), default=0)
        out = [f"{label}: {self.filename}"]
        for offset, text in enumerate(self.lines):
            line = self.first_line + offset
            names = ", ".join(by_line.get(line, []))
            arrow = "->" if names else "  "
            out.append(f"{names:>{width}} {arrow} {line:>5} {text.rstrip()}")
        return "\n".join(out)


class _InfoCache:
    """Rewritten forwards by class or function, least recently used dropped past ``limit``.

    The functions a model calls through ``.source`` can be chosen at run time, so a process
    that runs for weeks may meet many; an evicted one is rewritten again when next used.
    """

    def __init__(self, limit=512):
        import threading

        self.limit = limit
        self._infos = LRU(limit)
        self._lock = threading.RLock()  # rewriting a forward may need another's info

    def __len__(self):
        return len(self._infos)

    def get(self, target) -> SourceInfo:
        with self._lock:
            return self._get(target)

    def _get(self, target) -> SourceInfo:
        key = target.__func__ if isinstance(target, types.MethodType) else target
        info = self._infos.get(key)
        if info is None:
            info = self._infos.put(key, SourceInfo(target))
        return info


infos = _InfoCache()


def source_info(target) -> SourceInfo:
    """The rewritten forward of a module class, or the rewritten version of a function."""
    return infos.get(target)


def _dispatch(module, name, fn, *args, **kwargs):
    """Every call site of a rewritten forward goes through here."""
    hook = active_hook(module)
    ops = hook.ops if hook is not None else None
    op = ops.get(name) if ops else None
    if op is None or op.interleaver is None:
        return fn(*args, **kwargs)
    return op.call(fn, args, kwargs)


def _rewritten_forward(module, slot):
    """The module's forward with every call site named, inside whatever wraps the instance's forward.

    accelerate's device hooks (``device_map=...``) wrap an instance's forward and keep
    the class's as ``_old_forward``; their pre/post steps still run around ours.
    """
    rewritten = types.MethodType(source_info(type(module)).forward, module)
    accelerate_hook = module.__dict__.get("_hf_hook")
    if slot.wraps_instance_forward and accelerate_hook is not None and "_old_forward" in module.__dict__:

        def forward(*args, **kwargs):
            args, kwargs = accelerate_hook.pre_forward(module, *args, **kwargs)
            if accelerate_hook.no_grad:
                with torch.no_grad():
                    output = rewritten(*args, **kwargs)
            else:
                output = rewritten(*args, **kwargs)
            return accelerate_hook.post_forward(module, output)

        return forward
    if slot.wraps_instance_forward:
        raise NNsightError(
            f"{type(module).__name__}.source cannot be used here: something other than accelerate "
            "replaced this module instance's forward, and nnsight cannot run its named operations inside it"
        )
    return rewritten


class OperationHook(ModuleHook):
    """Serves one call site of a rewritten forward, like a ModuleHook serves a module."""

    __slots__ = ("name", "module_hook", "parent_key")

    def __init__(self, module, path, dotted, name, parent_key):
        super().__init__(module, path, dotted)
        self.name = name
        self.module_hook = None
        self.parent_key = parent_key  # the module's hook key, or the enclosing operation's

    def install(self, interleaver, counts_steps=False):
        self.interleaver = interleaver
        self.step = None
        self.count = 0
        self.waiting = 0
        self.waiting_input = 0
        self.counts_steps = False
        parent = interleaver.hooks[self.parent_key]
        if parent.ops is None:
            parent.ops = {}
            if type(parent) is ModuleHook:
                # The rewritten forward runs for every later call of this module in this trace.
                parent.forward = _rewritten_forward(self.module, parent.slot)
        parent.ops[self.name] = self
        self.module_hook = parent

    def remove(self):
        if self.interleaver is None:
            return
        self.interleaver = self.call_inputs = self.forward = self.module_hook = None
        self.observers = None

    def call(self, fn, args, kwargs):
        if self.ops:  # operations inside the called function are in use: run its rewritten version
            info = source_info(fn)
            missing = [name for name in self.ops if name not in info.operations]
            if missing:
                raise AttributeError(
                    f"{self.path}.source has no operation {missing[0]!r}; operations: " + ", ".join(info.operations)
                )
            rewritten = info.bind(self._dispatch_inner)
            fn = types.MethodType(rewritten, fn.__self__) if isinstance(fn, types.MethodType) else rewritten
        self.forward = fn
        return self(args, kwargs)

    def _dispatch_inner(self, _first, name, fn, *args, **kwargs):
        op = self.ops.get(name) if self.ops else None
        if op is None or op.interleaver is None:
            return fn(*args, **kwargs)
        return op.call(fn, args, kwargs)


class OperationEnvoy(ValueAccess):
    """``module.source.<op>``: one operation inside a module's forward."""

    def __init__(self, parent, name):
        self._parent = parent  # the module's envoy, or the operation whose function this one is inside
        self._name = name
        self._module = parent._module
        self._display = f"{parent._display}.source.{name}"
        self._path = f"{parent._path}.source.{name}"
        self._hook = None

    def _new_hook(self):
        return OperationHook(self._module, self._display, self._path, self._name, self._parent._key())

    def _key(self):
        return (id(self._module), self._path)

    @property
    def source(self):
        """Operations inside the function called here (known once the model calls it, inside a trace)."""
        accessor = self.__dict__.get("_source_accessor")
        if accessor is None:
            accessor = self.__dict__["_source_accessor"] = CalledSourceAccessor(self)
        return accessor

    def _mediator(self, what):
        mediator = current_mediator()
        if mediator is None:
            raise NNsightError(f"{self._display}.{what} is only available inside a trace")
        return mediator

    def skip(self, value):
        """Do not make this call in the current forward; the code sees ``value`` as its result."""
        self._mediator("skip()").skip(self, value)

    def __repr__(self):
        return f"<operation {self._display}>"


class SourceAccessor:
    """``envoy.source``: print it to see the operations; attribute access gives one."""

    def __init__(self, envoy):
        self._envoy = envoy
        self._info = source_info(type(envoy._module))
        self._ops = {}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._info.operations:
            raise AttributeError(
                f"{self._envoy._display}.source has no operation {name!r}; operations: "
                + ", ".join(self._info.operations)
            )
        op = self._ops.get(name)
        if op is None:
            op = self._ops[name] = OperationEnvoy(self._envoy, name)
        return op

    def __dir__(self):
        return list(self._info.operations)

    def __repr__(self):
        return self._info.listing(f"{self._envoy._display}.source")

    __str__ = __repr__


class CalledSourceAccessor:
    """``op.source``: operations of the function an operation calls.

    Which function that is may only be known when the model runs (``attention_interface``
    is chosen at run time), so names are checked when the operation is called.
    """

    def __init__(self, op_envoy):
        self._envoy = op_envoy
        self._ops = {}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        op = self._ops.get(name)
        if op is None:
            op = self._ops[name] = OperationEnvoy(self._envoy, name)
        return op

    def __repr__(self):
        return (
            f"{self._envoy._display}.source: the operations of the function called there are named when the "
            "model calls it; use them inside a trace"
        )
