"""Run one remote request against a served model, inside the sandbox (in the worker process).

The body's source is registered in ``linecache`` under ``<nnsight-remote:JOB>`` with
the user's line numbers; a generated module ``with __nnsight_ctx__ as NAME:`` (whose
own body is a ``pass``) enters the real tracer, so the tracing engine captures the
block from that source exactly as it does locally, and compiles it through
``policy.restricted_compile`` (found as ``__nnsight_compile__`` in the block's globals).
"""

from __future__ import annotations

import keyword
import linecache
import traceback
import types

from ..remote.client import executing_remote_code
from ..remote.serialize import Decoder, Encoder, load_tensors
from ..remote.wire import ERROR_TYPES, IMPORTABLE_MODULES
from .errors import SandboxError
from .guards import Guards, make_print
from .policy import check_source, compile_user_function, is_reserved

PREFIX = "<nnsight-remote:"


def _ident(name, what):
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or is_reserved(name):
        raise SandboxError(f"invalid {what} name {name!r}")
    return name


def _register(filename, text):
    lines = text.splitlines(True)
    linecache.cache[filename] = (len(text), None, lines, filename)


def forget(job_id):
    """Drop what this job left in linecache and in the engine's per-file caches."""
    from ..tracing import capture

    tag = f"{PREFIX}{job_id}"
    for key in [k for k in linecache.cache if isinstance(k, str) and k.startswith(tag)]:
        del linecache.cache[key]
    capture.blocks.forget(tag)


class Definitions:
    """The functions and classes a request sent by value, defined in ``scope`` through the sandbox.

        definitions = Definitions(request["functions"], scope, "<nnsight-remote:JOB", "user.py")
        decoder = Decoder(..., function=definitions.resolve, instance=definitions.instance)
        definitions.bind(decoder)
        decode_in_order(values, decoder, scope)   # plain values first: a decorator may need them
        definitions.finish()                      # every definition defined, in scope

    All sources are checked and compiled at once; each is executed when first needed, with
    its closure values and defaults decoded then (defaults are the values the client saw).
    """

    def __init__(self, specs, scope, tag, user_file):
        self.scope = scope
        self.specs = {}
        self.code = {}
        self.defined = {}
        self.refused = {}  # name -> the SandboxError its source got (e.g. one function of a module sent by value)
        self.decoder = None
        for spec in specs:
            name = _ident(spec["name"], "function")
            lineno = int(spec["lineno"])
            text = "\n" * (lineno - 1) + spec["source"]
            _register(f"{tag}:{name}>", text)
            closure = spec.get("closure") or {}
            for var in closure:
                _ident(var, "closure variable")
            self.specs[name] = spec
            try:
                code, defined = compile_user_function(text, spec.get("filename") or user_file, closure=sorted(closure))
            except SandboxError as error:  # raised when (and only if) the definition is used
                self.refused[name] = error
                continue
            if defined != name:
                raise SandboxError(f"function {name!r}: its source defines {defined!r}")
            self.code[name] = code

    def bind(self, decoder):
        self.decoder = decoder

    def resolve(self, name):
        if name in self.defined:
            return self.defined[name]
        if name in self.refused:
            raise self.refused[name]
        if name not in self.code:
            raise SandboxError(f"function or class {name!r} was referenced but its source was not sent")
        spec, decode = self.specs[name], self.decoder.decode
        exec(self.code.pop(name), self.scope)
        closure = spec.get("closure") or {}
        if closure:  # the function, made inside a factory taking its closure's values
            values = {var: decode(v, f"closure variable {var!r} of {name!r}") for var, v in closure.items()}
            self.scope[name] = self.scope.pop(f"__nnsight_closure_{name}__")(**values)
        target = self.defined[name] = self.scope[name]
        if spec.get("defaults") is not None:
            defaults = decode(spec["defaults"], f"defaults of {name!r}")
            if not isinstance(defaults, list) or not isinstance(target, types.FunctionType):
                raise SandboxError(f"malformed defaults of {name!r}")
            target.__defaults__ = tuple(defaults)
        if spec.get("kwdefaults") is not None:
            kwdefaults = decode(spec["kwdefaults"], f"keyword defaults of {name!r}")
            if not isinstance(kwdefaults, dict) or not all(isinstance(k, str) for k in kwdefaults) or not isinstance(target, types.FunctionType):
                raise SandboxError(f"malformed keyword defaults of {name!r}")
            target.__kwdefaults__ = kwdefaults
        return target

    def instance(self, class_name, state):
        """An object of a class sent by value, with ``state`` as its attributes (``__init__`` is not run)."""
        cls = self.resolve(class_name)
        if not isinstance(cls, type):
            raise SandboxError(f"{class_name!r} is not a class")
        obj = object.__new__(cls)
        obj.__dict__.update(state)
        return obj

    def finish(self):
        for name in list(self.code):
            self.resolve(name)


def _uses_definitions(tree) -> bool:
    if isinstance(tree, list):
        return any(_uses_definitions(v) for v in tree)
    if isinstance(tree, dict):
        return tree.get("$t") in ("function", "object") or any(_uses_definitions(v) for v in tree.values())
    return False


def decode_in_order(raw: dict, decoder, scope: dict):
    """Decode ``raw`` values into ``scope``: those without the user's code first (decorators may need them)."""
    for plain_first in (True, False):
        for name, value in raw.items():
            if _uses_definitions(value) != plain_first:
                _ident(name, "variable")
                scope[name] = decoder.decode(value, f"variable {name!r}")


def run_request(model, guards: Guards, request: dict, job_id: str, emit_print, max_print=65536, max_tensor_bytes=None,
                make_context=None):
    """Run ``request`` (a ``JobRequest`` as a dict); returns ``(values, blob)`` of the saved names.

    make_context: ``(kind, inputs, kwargs) -> context`` to use instead of the model's own
    ``trace``/``generate``/``session`` (the server's co-batching passes one); None for the model's.
    """
    filename = f"{PREFIX}{job_id}>"
    body = request["source"]
    first = int(request["body_lineno"])
    as_name = request.get("as_name")
    if as_name is not None:
        _ident(as_name, "`as`")
    user_file = request.get("filename") or "<remote>"

    # 1. static check of everything the user wrote, with the user's line numbers
    check_source("\n" * (first - 2) + "if True:\n" + body, user_file)
    scope = guards.scope(make_print(emit_print, max_print))

    # 2. user functions and classes
    definitions = Definitions(request.get("functions") or [], scope, f"{PREFIX}{job_id}", user_file)

    def envoy(path):
        if any(part.startswith("_") for part in path.split(".")):
            raise SandboxError(f"invalid module path {path!r}")
        if path == model.path:
            return model
        return model.get(path)

    def module(ref):
        name, _, attr = ref.partition(":")  # "torch" or "torch.nn.functional:relu"
        if name not in IMPORTABLE_MODULES:
            raise SandboxError(f"module {name!r} is not available remotely")
        proxy = guards.proxy(name)
        return guards.getattr(proxy, attr) if attr else proxy

    decoder = Decoder(load_tensors(request.get("tensors"), max_tensor_bytes), envoy=envoy, module=module,
                      function=definitions.resolve, instance=definitions.instance)
    definitions.bind(decoder)
    raw_inputs, raw_kwargs, raw_vars = request.get("inputs") or [], request.get("kwargs") or {}, request.get("variables") or {}
    if not isinstance(raw_inputs, list) or not isinstance(raw_kwargs, dict) or not isinstance(raw_vars, dict):
        raise SandboxError("malformed request")
    decode_in_order(raw_vars, decoder, scope)  # straight into the scope: a decorator may need an earlier value
    variables = {name: scope[name] for name in raw_vars}
    definitions.finish()
    inputs = [decoder.decode(v, f"input {i}") for i, v in enumerate(raw_inputs)]
    kwargs = {k: decoder.decode(v, f"keyword argument {k!r}") for k, v in raw_kwargs.items()}
    for name in kwargs:
        _ident(name, "keyword argument")
        if name in ("remote", "blocking"):
            raise SandboxError(f"{name}= is not allowed here")
    for name in variables:
        _ident(name, "variable")
    scope.update(variables)

    kind = request["kind"]
    if make_context is not None:
        ctx = make_context(kind, inputs, kwargs)
    elif kind == "trace":
        ctx = model.trace(*inputs, **kwargs)
    elif kind == "generate":
        if not hasattr(model, "generate"):
            raise SandboxError("this model does not support generate")
        ctx = model.generate(*inputs, **kwargs)
    elif kind == "session":
        if inputs or kwargs:
            raise SandboxError("a session takes no inputs")
        ctx = model.session()
    else:
        raise SandboxError(f"unknown kind {kind!r}")
    scope["__nnsight_ctx__"] = ctx

    # 3. the block, found by the engine through linecache
    header = f"with __nnsight_ctx__ as {as_name}:\n" if as_name else "with __nnsight_ctx__:\n"
    pad = "\n" * (first - 2)
    _register(filename, pad + header + body)
    # The job id in a constant keeps this code object unequal to another job's: code objects
    # compare by value (not by file name), and the engine caches captured blocks by code object.
    outer = compile(pad + header + f"    __nnsight_body__ = {job_id!r}\n", filename, "exec")
    before = {name: id(value) for name, value in scope.items()}
    with executing_remote_code():
        exec(outer, scope)

    saved = {
        name: value
        for name, value in scope.items()
        if not name.startswith("_") and name != as_name and before.get(name) != id(value)
    }
    encoder = Encoder(envoy_path=lambda v: None)
    tree = {name: encoder.encode(value, f"saved value {name!r}") for name, value in saved.items()}
    return tree, encoder.blob()


def describe_error(error: BaseException, job_id: str, user_file: str, functions_files=None) -> dict:
    """``ErrorInfo`` (as a dict) for an exception of a job: type, message, the user's frames."""
    tag = f"{PREFIX}{job_id}"
    frames = []
    for entry in traceback.extract_tb(error.__traceback__):
        if entry.filename.startswith(tag) and entry.name != "<module>":
            line = linecache.getline(entry.filename, entry.lineno).strip()
            frames.append({"filename": user_file, "lineno": entry.lineno, "name": _frame_name(entry.name), "line": line})
    name = type(error).__name__
    if name not in ERROR_TYPES:
        name = "RemoteError"
        message = f"{type(error).__name__}: {error}"
    else:
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    message = message.replace(f"{tag}>", user_file)
    if len(message) > 20_000:
        message = message[:20_000] + " ..."
    return {"type": name, "message": message, "traceback": frames[-20:]}


def _frame_name(name):
    if name.startswith("__nnsight_"):
        return "<with block>"
    return name
