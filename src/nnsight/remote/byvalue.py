"""Which of the user's functions and classes travel by value (as source) to a remote block.

    from nnsight.remote.byvalue import is_local_module, register
    register(mymodule)             # or register("mymodule"): send its code by value
    is_local_module("mymodule")    # True for the user's own files, never for stdlib or installed packages

Code from the user's script (``__main__``) and from the user's own modules (files
outside site-packages and the standard library) is sent as source; so is code of
modules passed to ``register``. Installed packages are not: remote code can only
use what the server provides (see ``wire.IMPORTABLE_MODULES``).
"""

from __future__ import annotations

import __future__
import ast
import inspect
import os
import sys
import sysconfig
import textwrap
import types

from .serialize import Encoder, UnsupportedValue
from .wire import IMPORTABLE_MODULES, SANDBOX_BUILTINS

class ByValueModules:
    """Module names whose code is sent by value (``nnsight.register``); one per process, grows only by user calls."""

    def __init__(self):
        self.names: set[str] = set()

    def add(self, module):
        if isinstance(module, types.ModuleType):
            name = module.__name__
        elif isinstance(module, str) and module:
            name = module
        else:
            raise TypeError(f"nnsight.register takes a module or its name, not {type(module).__name__}")
        if is_stdlib(name):
            raise ValueError(f"{name!r} is part of Python's standard library; it cannot be sent by value")
        self.names.add(name)

    def __contains__(self, name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in self.names for i in range(1, len(parts) + 1))


registered = ByValueModules()


def register(module) -> None:
    """Send the code of ``module`` (a module or its name) by value in remote blocks.

        import mymodule, nnsight
        nnsight.register(mymodule)
        with model.trace("Hello", remote=True):
            out = mymodule.myfn(model).save()
    """
    registered.add(module)


def is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def _installed_roots() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {p for p in sys.path if "site-packages" in p or "dist-packages" in p}
    return tuple(os.path.realpath(p) + os.sep for p in paths if p)


def is_local_module(name: str | None) -> bool:
    """Whether the module ``name`` is the user's own code (script, notebook, local file) or registered."""
    if not name:
        return False
    if name in registered:
        return True
    if is_stdlib(name) or name == "nnsight" or name.startswith("nnsight."):
        return False
    if name == "__main__":
        return True
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if not path:
        return False
    return not os.path.realpath(path).startswith(_installed_roots())


# -- encoding the user's code by value ----------------------------------------------------


class ByValue:
    """Collects, for one request, the user's functions and classes sent by value and the globals they read.

        by_value = ByValue()
        encoder = by_value.encoder(envoy_path=...)     # a serialize.Encoder that knows these values
        tree = encoder.encode(value, "x")
        by_value.definitions()                          # [FunctionSource dicts], in definition order
        by_value.globals                                # {name: encoded value} the definitions read

    Functions: source (lambdas as ``def _lambda_<n>``), closure values, defaults as evaluated
    locally, the globals they read. Classes: the ``class`` statement's source and the globals it
    reads. Instances of those classes: their class and their ``__dict__``. Functions of the
    modules remote code may import travel by name (``"torch.nn.functional:gelu"``).
    """

    def __init__(self):
        self._defs: dict[int, dict] = {}
        self.globals: dict[str, object] = {}
        self._encoder = None

    def encoder(self, envoy_path=None):
        self._encoder = Encoder(envoy_path=envoy_path, module_name=self._module_ref, function_name=self._function_ref,
                                object_state=self._object_state)
        return self._encoder

    def definitions(self) -> list[dict]:
        return list(self._defs.values())

    # -- finders the encoder calls -----------------------------------------------------

    def _module_ref(self, value):
        if isinstance(value, types.ModuleType):
            if value.__name__ in IMPORTABLE_MODULES:
                return value.__name__
            if is_local_module(value.__name__):
                return None  # the user's own module: sent by value as a namespace (see _object_state)
            raise UnsupportedValue(f"the module {value.__name__} is not available remotely (available: {', '.join(IMPORTABLE_MODULES)})")
        if callable(value) and not isinstance(value, type):
            return _allowed_attribute(value)
        return None

    def _function_ref(self, value):
        if isinstance(value, types.FunctionType):
            return self._function(value)
        if isinstance(value, type) and is_local_module(value.__module__):
            return self._class(value)
        return None

    def _object_state(self, value):
        if isinstance(value, types.ModuleType):  # the user's own module: what it defines and its constants
            if not is_local_module(value.__name__):
                return None
            attrs = {}
            for k, v in vars(value).items():
                if k.startswith("_") or (isinstance(v, types.ModuleType) and v.__name__ not in IMPORTABLE_MODULES):
                    continue
                if getattr(v, "__module__", value.__name__) == value.__name__ or not callable(v):
                    attrs[k] = v
            return value.__name__, attrs, {}
        cls = type(value)
        if isinstance(value, (types.FunctionType, type)) or not is_local_module(getattr(cls, "__module__", None)):
            return None
        state = getattr(value, "__dict__", None)
        if not isinstance(state, dict) or hasattr(cls, "__slots__"):
            return None
        return self._class(cls), dict(state)

    # -- definitions ----------------------------------------------------------------------

    def _not_local(self, what, qualname, module):
        return UnsupportedValue(
            f"{what} {qualname!r} comes from the installed package {module!r}, which the server does not "
            f"provide; use what the server allows ({', '.join(IMPORTABLE_MODULES)}), or call nnsight.register({module!r}) "
            "to send that package's code by value"
        )

    def _read_globals(self, name, source, code, namespace) -> set:
        """Encode the globals ``source`` reads (defaults, annotations, bodies); returns the names sent."""
        names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        if code is not None:
            names |= _global_names(code)
        for ref in sorted(names):
            if ref in namespace and ref not in self.globals:
                try:
                    self.globals[ref] = self._encoder.encode(namespace[ref], f"global {ref!r} of {name!r}")
                except UnsupportedValue:
                    continue  # attribute names also appear in co_names; a missing one fails remotely with NameError
        return {ref for ref in names if ref in namespace and ref in self.globals}

    def _function(self, fn):
        key = id(fn)
        if key in self._defs:
            return self._defs[key]["name"]
        module = getattr(fn, "__module__", None)
        if not is_local_module(module):
            raise self._not_local("function", fn.__qualname__, module)
        name, source, lineno = _function_source(fn, len(self._defs))
        entry = self._defs[key] = {"name": name, "source": source, "lineno": lineno, "filename": fn.__code__.co_filename}
        if fn.__defaults__:  # values as evaluated where the def ran, not re-evaluated remotely
            entry["defaults"] = self._encoder.encode(list(fn.__defaults__), f"defaults of function {name!r}")
        if fn.__kwdefaults__:
            entry["kwdefaults"] = self._encoder.encode(dict(fn.__kwdefaults__), f"keyword defaults of function {name!r}")
        closure = {}
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            if var == fn.__name__:
                continue  # a nested recursive function: the sandbox rebuilds that reference itself
            try:
                value = cell.cell_contents
            except ValueError:
                raise UnsupportedValue(f"function {name!r} uses {var!r}, which is not bound yet") from None
            closure[var] = self._encoder.encode(value, f"closure variable {var!r} of function {name!r}")
        if closure:
            entry["closure"] = closure
        sent = self._read_globals(name, source, fn.__code__, fn.__globals__)
        future = bool(fn.__code__.co_flags & __future__.annotations.compiler_flag)
        entry["source"] = _prepared_source(source, sent | set(closure) | set(SANDBOX_BUILTINS), future, fn.__annotations__)
        return name

    def _class(self, cls):
        key = id(cls)
        if key in self._defs:
            return self._defs[key]["name"]
        if not is_local_module(cls.__module__):
            raise self._not_local("class", cls.__qualname__, cls.__module__)
        if "<locals>" in cls.__qualname__:
            raise UnsupportedValue(f"class {cls.__qualname__!r} is defined inside a function; define it at module level")
        try:
            lines, first = inspect.getsourcelines(cls)
        except (OSError, TypeError):
            raise UnsupportedValue(f"the source of class {cls.__qualname__!r} cannot be found") from None
        source = textwrap.dedent("".join(lines))
        entry = self._defs[key] = {"name": cls.__name__, "source": source, "lineno": first,
                                   "filename": inspect.getsourcefile(cls) or "<remote>"}
        module = sys.modules.get(cls.__module__)
        namespace = vars(module) if module is not None else {}
        sent = self._read_globals(cls.__name__, source, None, namespace)
        # `from __future__ import annotations` binds the name `annotations` in the module to that feature
        future = namespace.get("annotations") is __future__.annotations
        entry["source"] = _prepared_source(source, sent | set(SANDBOX_BUILTINS), future)
        return cls.__name__


def _allowed_attribute(value):
    """``"torch.nn.functional:relu"`` for a function of a module remote code may import (sent by name)."""
    module, name = getattr(value, "__module__", None), getattr(value, "__name__", None)
    if not isinstance(name, str) or not isinstance(module, str):
        return None
    for candidate in IMPORTABLE_MODULES:
        owner = sys.modules.get(candidate)
        if owner is not None and getattr(owner, name, None) is value:
            return f"{candidate}:{name}"
    return None


def _prepared_source(source: str, available: set, future: bool, local_annotations=None) -> str:
    """A ``def`` or ``class`` as sent: defaults as ``None`` (their values travel aside), annotations as the server evaluates them.

    An annotation stays an expression (evaluated on the server in the sandbox, as any code) when every
    name it reads is available there: a sandbox builtin, a sent global or closure value, or (inside the
    definition) a name it binds itself. Otherwise, and in files under ``from __future__ import
    annotations``, it is sent as its text, which is what such a file's ``__annotations__`` hold locally
    (``local_annotations``: the function's own, used as they are).
    """
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return source
    inside = available | _bound_names(node)
    edits = []  # (expression node, the text replacing it)

    def annotation(expr, key=None):
        if expr is None:
            return
        if future and key is not None and isinstance((local_annotations or {}).get(key), str):
            edits.append((expr, repr(local_annotations[key])))
        elif future or not {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} <= (inside if key is None else available):
            edits.append((expr, repr(ast.unparse(expr))))

    function = not isinstance(node, ast.ClassDef)
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
            own = function and inner is node  # the function's own annotations are read in its module's scope
            args = inner.args
            for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if a is not None:
                    annotation(a.annotation, a.arg if own else None)
            annotation(inner.returns, "return" if own else None)
        elif isinstance(inner, ast.ClassDef):  # class-level `x: T` is evaluated when the class is made
            for stmt in inner.body:
                if isinstance(stmt, ast.AnnAssign):
                    annotation(stmt.annotation)
    if function:
        edits += [(d, "None") for d in node.args.defaults + node.args.kw_defaults if d is not None]
    return _replace_spans(source, edits)


def _replace_spans(source: str, edits) -> str:
    """``source`` with each node's text replaced, keeping every other line where it was (tracebacks name the user's lines)."""
    if not edits:
        return source
    lines = [line.encode("utf-8") for line in source.splitlines(True)]  # ast offsets count UTF-8 bytes
    for expr, text in sorted(edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
        first, last = expr.lineno - 1, expr.end_lineno - 1
        # a backslash-newline per line the node spanned keeps the following lines in place
        new = text.encode("utf-8") + b" \\\n" * (last - first)
        lines[first:last + 1] = [lines[first][:expr.col_offset] + new + lines[last][expr.end_col_offset:]]
    return b"".join(lines).decode("utf-8")


def _bound_names(node) -> set:
    """Names a function binds anywhere in its body (parameters, assignments, definitions, imports)."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not node:
            names.add(n.name)
        elif isinstance(n, ast.alias):
            names.add((n.asname or n.name).split(".")[0])
    return names


def _code_shape(code):
    """What identifies a lambda's code apart from where it was compiled (line numbers, file)."""
    consts = tuple(_code_shape(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.co_code, code.co_varnames, code.co_names, consts


def _global_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _function_source(fn, index) -> tuple[str, str, int]:
    """``(name, def-source, line)`` of ``fn``; a lambda becomes ``def _lambda_<n>(...): return ...``."""
    code = fn.__code__
    try:
        lines, first = inspect.getsourcelines(fn)
    except (OSError, TypeError):
        raise UnsupportedValue(f"the source of function {fn.__qualname__!r} cannot be found") from None
    text = textwrap.dedent("".join(lines))
    if fn.__name__ != "<lambda>":
        return fn.__name__, text, code.co_firstlineno
    try:
        tree = ast.parse(text)
    except SyntaxError:  # a lambda inside a larger expression that starts mid-statement
        tree = ast.parse("(" + text.strip().rstrip(",") + ")") if text.strip() else None
    candidates = [n for n in ast.walk(tree)] if tree is not None else []
    for node in candidates:
        if isinstance(node, ast.Lambda) and first + node.lineno - 1 == code.co_firstlineno:
            compiled = compile(ast.Expression(node), code.co_filename, "eval")
            inner = next(c for c in compiled.co_consts if isinstance(c, types.CodeType))
            if _code_shape(inner) == _code_shape(code):
                name = f"_lambda_{index}"
                definition = ast.FunctionDef(name=name, args=node.args, body=[ast.Return(node.body)], decorator_list=[],
                                             returns=None, type_params=[])
                return name, ast.unparse(ast.fix_missing_locations(ast.Module([definition], []))) + "\n", code.co_firstlineno
    raise UnsupportedValue(f"the source of a lambda on line {code.co_firstlineno} cannot be told apart; define it with `def`")
