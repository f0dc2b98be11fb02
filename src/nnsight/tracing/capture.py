"""Turn the body of a ``with model.trace(...)`` block into a compiled function.

    block = capture(frame)                # once per call site, then cached (``blocks``)
    skipper = block.skip(frame)           # Python's own run of the body raises SkipBlock
    scope = block.compiled().run(frame, tracer, save, assign)   # our run of it
    bind(frame, read_scope(scope))        # the names it saved, in the caller's scope

Python cannot defer a ``with`` body, so the tracer's ``__enter__`` asks for the
body to be skipped (``skip_body``) and its ``__exit__`` runs our compiled copy of
it instead. The copy keeps the user's file name and line numbers, so tracebacks
and error messages point at the user's own code.

The transformed body, for a block with explicit invokes::

    def __nnsight_block__(__nnsight_rt__, __nnsight_save__, __nnsight_unbound__, <caller locals>):
        with tracer.invoke("a") as __nnsight_invoker_0__:
            def __nnsight_invoke_0__(<loop variables, as defaults>):
                nonlocal <every name the block assigns>
                <invoke body>
            __nnsight_invoker_0__.set_body(__nnsight_invoke_0__)
        def __nnsight_scope__():
            nonlocal <every name>
        return __nnsight_scope__

Every name the block assigns is a local of ``__nnsight_block__`` shared by all
invokes through closures; that is how a value read in one invoke is usable in a
later one. A block without explicit invokes is one implicit invoke, ``__nnsight_invoke__``,
which is also its scope (its closure already holds every name). Inside
invoke bodies, ``with tracer.iter[...] as i:`` becomes ``for i in tracer.iter[...]:``
and ``x.save()`` becomes ``__nnsight_save__(x)``, so nothing global is patched.
"""

from __future__ import annotations

import __future__
import ast
import linecache
import sys
from dataclasses import dataclass

from .lru import LRU

RT = "__nnsight_rt__"
SAVE = "__nnsight_save__"
ASSIGN = "__nnsight_assign__"
TARGET = "__nnsight_target__"
_VALUE_ATTRS = ("output", "input", "inputs")
UNBOUND = "__nnsight_unbound__"
COMPILE_HOOK = "__nnsight_compile__"  # a global of the block's scope: compile_fn(module_ast, filename) -> code


class SkipBlock(BaseException):
    """Raised at the first line of a captured ``with`` body so Python skips it.

    A BaseException, so that a body starting with ``try: ... except Exception:`` does not catch it.
    """


class SourceUnavailableError(RuntimeError):
    """The source of a traced block cannot be found (``exec`` of a string, a REPL without history)."""


# ---------------------------------------------------------------------------
# Skipping the body of the user's `with` statement
# ---------------------------------------------------------------------------


class BodySkipper:
    """Make the first line event of the body (line ``body_line`` on) in ``frame`` raise :class:`SkipBlock`.

    Line events of the header come first where it spans lines (``with model.trace(\n x\n) as
    tracer:`` binds ``tracer`` on its last line), and they run as written.

    Line events only reach ``frame.f_trace`` while some trace function is set,
    so a no-op global one is installed for that moment. CPython drops the global
    trace function when a trace function raises, so whatever was there before
    (a debugger, coverage) is put back by ``restore`` from the tracer's ``__exit__``.
    """

    __slots__ = ("frame", "body_line", "previous_global", "previous_local", "armed")

    def __init__(self, frame, body_line: int):
        self.frame = frame
        self.body_line = body_line
        self.previous_global = sys.gettrace()
        self.previous_local = frame.f_trace
        self.armed = True
        frame.f_trace = self._on_event
        sys.settrace(_no_trace)

    def _on_event(self, frame, event, arg):
        # Only where an exception handler covers the instruction: CPython 3.11 runs the line
        # of a body's leading `try:` outside the `with` statement's handler, so there the
        # skip waits for the next line (inside the `try`, whose `except Exception` cannot
        # catch a BaseException, so it reaches the `with`).
        if event == "line" and self.armed and frame.f_lineno >= self.body_line and _handled_at(frame.f_code, frame.f_lasti):
            self.armed = False
            frame.f_trace = self.previous_local
            raise SkipBlock()
        return self._on_event

    def restore(self):
        self.armed = False
        sys.settrace(self.previous_global)
        self.frame.f_trace = self.previous_local


def _no_trace(frame, event, arg):
    return None


def _handled_at(code, offset: int) -> bool:
    """Whether an exception raised at byte ``offset`` of ``code`` reaches a handler there.

    Reads the code object's exception table (CPython 3.11+: entries of varint start,
    length, target and depth, in code units).
    """
    table = getattr(code, "co_exceptiontable", None)
    if table is None:  # before 3.11 there is no table, and every body line is inside the with block
        return True
    unit = offset // 2
    position = 0

    def varint():
        nonlocal position
        byte = table[position]
        position += 1
        value = byte & 63
        while byte & 64:
            byte = table[position]
            position += 1
            value = (value << 6) | (byte & 63)
        return value

    while position < len(table):
        start = varint()
        length = varint()
        varint()  # target
        varint()  # depth and lasti
        if start <= unit < start + length:
            return True
    return False


# ---------------------------------------------------------------------------
# Finding and transforming the block
# ---------------------------------------------------------------------------

def _source_lines(filename: str, frame) -> list[str]:
    """The lines of the file (or cell, or ``python -c`` command) the frame's code came from."""
    linecache.checkcache(filename)
    lines = linecache.getlines(filename, frame.f_globals)
    if not lines and filename == "<string>":
        lines = _command_lines(frame)
    if not lines:
        raise SourceUnavailableError(
            f"nnsight cannot find the source code of the traced block in {filename!r}. "
            "A trace block must live in a file, a Jupyter/IPython cell, a `python -c` command, "
            "or code whose text was registered in `linecache`; code run with exec() of a bare "
            "string has none."
        )
    return lines


def _command_lines(frame) -> list[str]:
    """The text of ``python -c TEXT`` when ``frame`` runs code compiled from exactly that text."""
    argv = getattr(sys, "orig_argv", [])
    if "-c" not in argv[:-1]:
        return []
    text = argv[argv.index("-c") + 1]
    outer = frame
    while outer.f_back is not None and outer.f_back.f_code.co_filename == "<string>":
        outer = outer.f_back
    try:
        command_code = compile(text, "<string>", "exec", dont_inherit=True)
    except SyntaxError:
        return []
    # exec() of another string also reports "<string>": only the command's own code qualifies.
    if outer.f_code != command_code:
        return []
    return text.splitlines(True)


_STATEMENT_LISTS = ("body", "orelse", "finalbody", "handlers", "cases")  # where statements nest


def _statements(tree: ast.Module):
    """Every statement of ``tree`` (expressions hold none, so only statement lists are entered:
    much less than ``ast.walk`` of a whole file)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        d = node.__dict__
        for name in _STATEMENT_LISTS:
            items = d.get(name)
            if items:
                stack.extend(items)
        if isinstance(node, ast.stmt):
            yield node


def _with_index(tree: ast.Module) -> dict[int, ast.With]:
    """Each ``with`` header line -> the innermost ``with`` statement that spans it."""
    index = {}
    for node in _statements(tree):
        if isinstance(node, ast.With):
            header_end = max(node.lineno, node.body[0].lineno - 1)
            for line in range(node.lineno, header_end + 1):
                known = index.get(line)
                if known is None or node.lineno >= known.lineno:
                    index[line] = node
    return index


def _with_at(code, lineno: int, lines: list[str], filename: str) -> ast.With | None:
    """The ``with`` statement whose ``with`` is on line ``lineno``, parsed on its own.

    The compiler gives the statement's own instructions (its exit) the whole statement's
    extent, so the longest position of ``code`` starting on that line says where it ends;
    only those lines are parsed, not the whole file (a long script's parse is tens of ms on
    its first trace). None where that does not give exactly one such ``with`` (a header
    split so that the call is on a later line, or an older Python): the caller then parses
    the file.
    """
    end = 0
    for start, stop, _, _ in code.co_positions():
        if start == lineno and stop is not None and stop > end:
            end = stop
    if not end or end > len(lines):
        return None
    # Past its end a statement's block cannot go on: a deeper line there means the code is not
    # the text's (the sandbox runs a one-line stand-in for a job's body), so the file decides.
    margin = lines[lineno - 1][: len(lines[lineno - 1]) - len(lines[lineno - 1].lstrip())]
    for following in range(end, len(lines)):  # (not a slice: that copies the rest of the file)
        line = lines[following]
        stripped = line.lstrip()
        if stripped and not stripped.startswith("#"):
            indent = line[: len(line) - len(stripped)]
            if not margin.startswith(indent):
                return None
            break
    text = "".join(lines[lineno - 1 : end])
    indented = text[:1] in (" ", "\t")
    if indented and lineno < 2:
        return None
    # Blank lines before the text give the parse the file's own line numbers.
    source = "\n" * (lineno - 2) + "if 1:\n" + text if indented else "\n" * (lineno - 1) + text
    try:
        tree = ast.parse(source, filename)
    except SyntaxError:  # not a whole statement: the extent was not the with statement's
        return None
    body = tree.body[0].body if indented else tree.body
    if len(body) != 1 or type(body[0]) is not ast.With or body[0].lineno != lineno or body[0].end_lineno != end:
        return None
    return body[0]


def _find_with(index: dict[int, ast.With], lineno: int, filename: str) -> ast.With:
    best = index.get(lineno)
    if best is None:
        raise SourceUnavailableError(
            f"nnsight could not find the `with` statement at {filename}:{lineno}. "
            "Tracers must be used as `with model.trace(...):` blocks."
        )
    _check_own_lines(best, filename, lineno)
    return best


def _check_own_lines(best: ast.With, filename: str, lineno: int):
    """A body on the ``with`` line gets no line event of its own, so it could not be skipped."""
    if best.body[0].lineno == best.lineno:
        raise SyntaxError(
            f"{filename}:{lineno}: put the body of a `with model.trace(...)` block on its own "
            "lines; nnsight cannot skip a body written on the same line as `with`."
        )


def _check_first_statement(node: ast.With, filename: str):
    """A body starting with ``try:`` is skipped inside that ``try`` (see BodySkipper): its
    ``finally`` would run, and a bare ``except:`` would catch the skip."""
    first = node.body[0]
    if not isinstance(first, ast.Try):
        return
    catches_all = any(
        h.type is None or (isinstance(h.type, ast.Name) and h.type.id == "BaseException") for h in first.handlers
    )
    if first.finalbody or catches_all:
        raise SyntaxError(
            f"{filename}:{first.lineno}: a `with model.trace(...)` block cannot start with a `try` that has "
            "`finally:` or a bare `except:`; put any other statement before it (nnsight runs the block's "
            "body itself, and Python would run that `finally` while skipping it)"
        )


def _call_attr(node) -> str | None:
    """``x.invoke(...)`` -> 'invoke'; ``x.iter[...]`` -> 'iter'; ``x.all()`` -> 'all'."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute):
        if node.value.attr == "iter":
            return "iter"
    return None


def _is_invoke(node) -> bool:
    return isinstance(node, ast.With) and len(node.items) == 1 and _call_attr(node.items[0].context_expr) == "invoke"


def _is_iter(node) -> bool:
    return (
        isinstance(node, ast.With)
        and len(node.items) == 1
        and _call_attr(node.items[0].context_expr) in ("iter", "all")
    )


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


class _Visitor(ast.NodeVisitor):
    """``ast.NodeVisitor`` with a cheaper walk of a node's fields (no generators): blocks are
    analysed on the first trace at each call site, where this is most of the cost."""

    def generic_visit(self, node):
        for name in node._fields:
            value = getattr(node, name, None)
            if type(value) is list:
                for item in value:
                    if isinstance(item, ast.AST):
                        self.visit(item)
            elif isinstance(value, ast.AST):
                self.visit(value)

    def visit_Load(self, node):  # the context of every name: nothing inside
        pass

    visit_Store = visit_Del = visit_Load


class _NameUse(_Visitor):
    """Names a list of statements binds and reads in its own scope (``invokes``: whether a
    ``with x.invoke(...)`` is anywhere inside)."""

    def __init__(self, skip_invokes=False):
        self.assigned: set[str] = set()
        self.loaded: set[str] = set()
        self.globals: set[str] = set()
        self.skip_invokes = skip_invokes
        self.invokes = False

    def visit_Name(self, node):
        (self.assigned if isinstance(node.ctx, (ast.Store, ast.Del)) else self.loaded).add(node.id)

    def visit_FunctionDef(self, node):
        self.assigned.add(node.name)
        for deco in node.decorator_list:
            self.visit(deco)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
            self.visit(default)
        inner = _NameUse()
        for stmt in node.body:
            inner.visit(stmt)
        self.loaded |= inner.loaded  # closures read the block's names
        self.invokes |= inner.invokes

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.assigned.add(node.name)
        for expr in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(expr)
        inner = _NameUse()
        for stmt in node.body:
            inner.visit(stmt)
        self.loaded |= inner.loaded - inner.assigned  # a class body's own names stay in the class
        self.invokes |= inner.invokes

    def visit_Lambda(self, node):
        inner = _NameUse()
        inner.visit(node.body)
        self.loaded |= inner.loaded

    def _visit_comprehension(self, node, inner=None):
        inner = inner or _NameUse()
        inner.generic_visit(node)
        self.loaded |= inner.loaded
        # A walrus inside a comprehension binds in the enclosing scope.
        for sub in ast.walk(node):
            if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
                self.assigned.add(sub.target.id)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _visit_comprehension

    def visit_Import(self, node):
        for alias in node.names:
            self.assigned.add((alias.asname or alias.name).split(".")[0])

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node):
        if node.name:
            self.assigned.add(node.name)
        self.generic_visit(node)

    def visit_Global(self, node):
        self.globals.update(node.names)

    visit_Nonlocal = visit_Global

    def visit_With(self, node):
        if _is_invoke(node):
            self.invokes = True
            if self.skip_invokes:
                for item in node.items:
                    self.visit(item)
                return
        self.generic_visit(node)


class _Scan(_NameUse):
    """What a block's body needs to be compiled, in one walk: its names (as ``_NameUse``),
    whether it has explicit invokes, and a refusal of statements that would leave the block
    early (nnsight runs the body itself, so ``return``/``yield``/``await``/a bare ``break``
    cannot work).

    ``rewrites`` turns true at anything ``_SaveRewriter`` may change (a ``.save`` call, an
    assignment to an attribute or item, a ``with`` or ``for``, a def, class or lambda, whose
    insides are not looked at), so a statement without any is compiled as written.
    """

    def __init__(self, filename):
        super().__init__()
        self.filename = filename
        self.loops = 0
        self.checking = True  # off in a def's or class's header, which runs where it is written
        self.rewrites = False
        self.needs_bound: set[str] = set()  # names deleted or updated in place (`del x`, `x += 1`)

    def visit_Delete(self, node):
        for target in node.targets:
            self.needs_bound.update(n.id for n in ast.walk(target) if type(n) is ast.Name)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        if type(node.target) is ast.Name:
            self.needs_bound.add(node.target.id)
        self.generic_visit(node)

    def _comprehension_scope(self):
        inner = _Scan(self.filename)
        inner.checking = self.checking
        return inner

    def _visit_comprehension(self, node):
        inner = self._comprehension_scope()
        super()._visit_comprehension(node, inner)
        self.rewrites |= inner.rewrites

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _visit_comprehension

    def visit_Call(self, node):
        if type(node.func) is ast.Attribute and node.func.attr == "save":
            self.rewrites = True
        self.generic_visit(node)

    def visit_Assign(self, node):
        if len(node.targets) == 1 and type(node.targets[0]) in (ast.Attribute, ast.Subscript):
            self.rewrites = True
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self.rewrites = True
        self.generic_visit(node)

    def visit_With(self, node):
        self.rewrites = True
        super().visit_With(node)

    def visit_Lambda(self, node):
        self.rewrites = True
        super().visit_Lambda(node)

    def _refuse(self, node, what):
        if not self.checking:
            return
        raise SyntaxError(
            f"{self.filename}:{node.lineno}: `{what}` directly inside a `with model.trace(...)` block is not "
            "supported, because nnsight runs the block's body itself, alongside the model. Save the value and "
            f"use `{what}` after the block."
        )

    def visit_Return(self, node):
        self._refuse(node, "return")
        self.generic_visit(node)

    def visit_Yield(self, node):
        self._refuse(node, "yield")
        self.generic_visit(node)

    visit_YieldFrom = visit_Yield

    def visit_Await(self, node):
        self._refuse(node, "await")
        self.generic_visit(node)

    def _loop(self, node):
        self.rewrites = True
        self.loops += 1
        self.generic_visit(node)
        self.loops -= 1

    visit_For = visit_While = visit_AsyncFor = _loop

    def visit_Break(self, node):
        if not self.loops:
            self._refuse(node, "break")

    def visit_Continue(self, node):
        if not self.loops:
            self._refuse(node, "continue")

    def _definition(self, node, visit):
        self.rewrites = True
        checking, self.checking = self.checking, False
        try:
            visit(self, node)
        finally:
            self.checking = checking

    def visit_FunctionDef(self, node):
        self._definition(node, _NameUse.visit_FunctionDef)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._definition(node, _NameUse.visit_ClassDef)


def _names(stmts, skip_invokes=False) -> _NameUse:
    use = _NameUse(skip_invokes)
    for stmt in stmts:
        use.visit(stmt)
    return use


class _FirstUse(ast.NodeVisitor):
    """Names whose first use, in the order Python evaluates a list of statements, is a read.

    Such a name means a value from before this code (``hs = hs * 2``); a name the code
    binds before reading it (a loop variable) is the code's own.
    """

    def __init__(self):
        self.seen: set[str] = set()
        self.reads_first: set[str] = set()

    def _use(self, name, load):
        if name not in self.seen:
            self.seen.add(name)
            if load:
                self.reads_first.add(name)

    def visit_Name(self, node):
        self._use(node.id, isinstance(node.ctx, ast.Load))

    def visit_Assign(self, node):
        self.visit(node.value)
        for target in node.targets:
            self.visit(target)

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_AugAssign(self, node):
        if isinstance(node.target, ast.Name):
            self._use(node.target.id, True)
        self.visit(node.value)
        self.visit(node.target)

    def visit_NamedExpr(self, node):
        self.visit(node.value)
        self.visit(node.target)

    def visit_For(self, node):
        self.visit(node.iter)
        self.visit(node.target)
        for stmt in node.body + node.orelse:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_FunctionDef(self, node):
        for expr in node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]:
            self.visit(expr)
        self._use(node.name, False)
        inner = _names(node.body)  # read when called, after this point
        for name in sorted(inner.loaded - inner.assigned):
            self._use(name, True)

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_Lambda(self, node):
        inner = _names([ast.Expr(node.body)])
        for name in sorted(inner.loaded):
            self._use(name, True)

    def _visit_comprehension(self, node):
        inner = _names([ast.Expr(node)])
        for name in sorted(inner.loaded):
            self._use(name, True)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _visit_comprehension


def _reads_before_assigning(stmts) -> set[str]:
    use = _FirstUse()
    for stmt in stmts:
        use.visit(stmt)
    return use.reads_first


class _Transformer(ast.NodeVisitor):
    """``ast.NodeTransformer`` that leaves its input alone: a node whose children change is copied.

        new_stmt = _SaveRewriter().visit(stmt)   # stmt, shared with the file's cached tree, is unchanged

    So a block is rewritten from the cached parse of its file, without a private parse of its own.
    A visit method returns its node, a replacement, or a list of replacements (in a list field).
    """

    def generic_visit(self, node):
        changed = None
        for name in node._fields:
            old = getattr(node, name, None)
            if type(old) is list:
                new = None
                for i, item in enumerate(old):
                    value = self.visit(item) if isinstance(item, ast.AST) else item
                    if value is not item and new is None:
                        new = old[:i]
                    if new is not None:
                        if type(value) is list:
                            new.extend(value)
                        else:
                            new.append(value)
                if new is not None:
                    changed = changed or {}
                    changed[name] = new
            elif isinstance(old, ast.AST):
                value = self.visit(old)
                if value is not old:
                    changed = changed or {}
                    changed[name] = value
        if changed is None:
            return node
        copy = type(node).__new__(type(node))
        copy.__dict__.update(node.__dict__)
        copy.__dict__.update(changed)
        return copy


_LOCATED = (ast.expr, ast.stmt, ast.excepthandler, ast.arg, ast.keyword, ast.alias, ast.pattern)


def _loc(node, ref):
    """Give generated ``node`` and its generated descendants ``ref``'s location; returns ``node``.

    Every node built here goes through this once, so a node that has a location (the user's
    own, or one built earlier) is located throughout and is not entered again; that keeps the
    cost to the generated nodes rather than a walk of the whole block.
    """
    r = ref.__dict__
    where = {
        "lineno": r["lineno"], "col_offset": r["col_offset"],
        "end_lineno": r.get("end_lineno") or r["lineno"], "end_col_offset": r.get("end_col_offset") or r["col_offset"],
    }
    AST, located = ast.AST, _LOCATED
    stack = [node]
    while stack:
        item = stack.pop()
        d = item.__dict__
        if "lineno" in d:
            if item is not node:
                continue
        elif isinstance(item, located):
            d.update(where)
        for name in item._fields:
            value = d.get(name)
            if type(value) is list:
                for v in value:
                    if isinstance(v, AST) and "lineno" not in v.__dict__:
                        stack.append(v)
            elif isinstance(value, AST) and "lineno" not in value.__dict__:
                stack.append(value)
    return node


def _rewrite(stmts, rewriter=None, plain=()):
    """Apply ``_SaveRewriter`` (after ``rewriter``) to statements; a statement may become several.

    ``plain``: flags, one per statement, true where it has nothing to rewrite (see ``_Scan``).
    """
    out = []
    for i, stmt in enumerate(stmts):
        if plain and plain[i]:
            out.append(stmt)
            continue
        node = rewriter.visit(stmt) if rewriter is not None else stmt
        node = _SaveRewriter().visit(node)
        out.extend(node if isinstance(node, list) else [node])
    return out


def _is_backward(node) -> bool:
    return isinstance(node, ast.With) and len(node.items) == 1 and _call_attr(node.items[0].context_expr) == "backward"


class _GradRewriter(_Transformer):
    """Inside ``with loss.backward():``, ``t.grad`` waits for the gradient and ``t.grad = g`` replaces it."""

    def visit_Attribute(self, node):
        node = self.generic_visit(node)
        if node.attr == "grad" and isinstance(node.ctx, ast.Load) and not (isinstance(node.value, ast.Name) and node.value.id == RT):
            return _loc(
                ast.Call(func=ast.Attribute(ast.Name(RT, ast.Load()), "grad", ast.Load()), args=[node.value], keywords=[]),
                node,
            )
        return node

    def visit_Assign(self, node):
        target = node.targets[0] if len(node.targets) == 1 else None
        if isinstance(target, ast.Attribute) and target.attr == "grad":
            value = self.visit(node.value)
            call = ast.Call(
                func=ast.Attribute(ast.Name(RT, ast.Load()), "set_grad", ast.Load()),
                args=[self.visit(target.value), _lambda(value)],
                keywords=[],
            )
            return _loc(ast.Expr(call), node)
        return self.generic_visit(node)


def _lambda(body):
    return ast.Lambda(
        args=ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
        body=body,
    )


def _reads_value(expr) -> bool:
    """Whether ``expr`` (an assignment target's base) goes through ``.output``/``.input``/``.inputs``."""
    while isinstance(expr, (ast.Subscript, ast.Attribute, ast.Call)):
        if isinstance(expr, ast.Attribute) and expr.attr in _VALUE_ATTRS:
            return True
        expr = expr.func if isinstance(expr, ast.Call) else expr.value
    return False


def _reads_any_value(expr) -> bool:
    """Whether ``.output``/``.input``/``.inputs`` is read anywhere in ``expr``."""
    return any(isinstance(n, ast.Attribute) and n.attr in _VALUE_ATTRS for n in ast.walk(expr))


class _SaveRewriter(_Transformer):
    """Rewrites inside a block that keep it free of global patching and make writes land in order.

    ``x.save()`` -> ``__nnsight_save__(x)``; ``with tracer.iter[...] as i:`` -> ``for i in ...:``;
    ``m.output = value`` -> ``__nnsight_assign__(m, "output", lambda: value)`` and
    ``m.output[0][:] = value`` -> ``t = m.output[0]; t[:] = value``: the model position
    is reached *before* ``value`` is evaluated, so a value another invoke produces
    at that same position is ready (the README's cross-invoke example). A ``value`` that
    reads a module's value itself (``h[1].output = h[0].output``) is left to Python's
    order, value first: its module runs before the target, so waiting for the target
    first would pass it.
    """

    _backward_count = 0

    def _backward(self, node):
        """``with loss.backward(**kw): body`` -> a body function run alongside ``loss.backward(**kw)``."""
        call = node.items[0].context_expr
        body = _GradRewriter().visit(ast.Module(body=node.body, type_ignores=[])).body
        body = [self.visit(stmt) for stmt in body]
        body = [s for stmt in body for s in (stmt if isinstance(stmt, list) else [stmt])]
        assigned = _names(node.body)
        names = sorted(assigned.assigned - assigned.globals)
        _SaveRewriter._backward_count += 1
        fn_name = f"__nnsight_backward_{_SaveRewriter._backward_count}__"
        out = []
        if names:  # bind them in the enclosing function, so the body's writes land there
            out.append(
                ast.If(
                    test=ast.Constant(False),
                    body=[ast.Assign(targets=[ast.Name(n, ast.Store()) for n in names], value=ast.Constant(None))],
                    orelse=[],
                )
            )
        out.append(_function(fn_name, body, node, set(names)))
        run = ast.Call(
            func=ast.Attribute(ast.Name(RT, ast.Load()), "backward", ast.Load()),
            args=[call.func.value, ast.Name(fn_name, ast.Load()), *call.args],
            keywords=call.keywords,
        )
        out.append(ast.Expr(run))
        if node.items[0].optional_vars is not None:
            raise SyntaxError("`with tensor.backward() as name:` binds nothing; drop the `as` part")
        return [_loc(stmt, node) for stmt in out]

    _in_definition = 0  # inside a def or class of the block, whose annotations are their own

    def _definition(self, node):
        self._in_definition += 1
        try:
            return self.generic_visit(node)
        finally:
            self._in_definition -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _definition

    def visit_AnnAssign(self, node):
        # The block's names are the caller's (nonlocal in the compiled body), and Python
        # refuses annotations on those; a function never evaluates a local's annotation
        # anyway, so ``h: T = v`` runs as ``h = v`` and a bare ``h: T`` as nothing.
        if self._in_definition:
            return self.generic_visit(node)
        if node.value is None:
            return _loc(ast.Pass(), node) if isinstance(node.target, ast.Name) else node
        return self.visit(_loc(ast.Assign(targets=[node.target], value=node.value), node))

    def visit_Assign(self, node):
        node = self.generic_visit(node)
        if len(node.targets) != 1 or _reads_any_value(node.value):
            return node
        target = node.targets[0]
        if isinstance(target, ast.Attribute) and target.attr in _VALUE_ATTRS:
            lazy = ast.Lambda(
                args=ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
                body=node.value,
            )
            call = ast.Call(
                func=ast.Name(ASSIGN, ast.Load()), args=[target.value, ast.Constant(target.attr), lazy], keywords=[]
            )
            return _loc(ast.Expr(call), node)
        if isinstance(target, ast.Subscript) and _reads_value(target.value):
            base = target.value
            first = _loc(ast.Assign(targets=[ast.Name(TARGET, ast.Store())], value=base), node)
            second = _loc(
                ast.Assign(
                    targets=[ast.Subscript(value=ast.Name(TARGET, ast.Load()), slice=target.slice, ctx=ast.Store())],
                    value=node.value,
                ),
                node,
            )
            return [first, second]
        return node

    def visit_Call(self, node):
        node = self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "save":
            return _loc(
                ast.Call(
                    func=ast.Name(SAVE, ast.Load()),
                    args=[node.func.value, *node.args],
                    keywords=node.keywords,
                ),
                node,
            )
        return node

    def visit_With(self, node):
        if _is_backward(node):
            return self._backward(node)
        node = self.generic_visit(node)
        if _is_iter(node):
            item = node.items[0]
            target = item.optional_vars or ast.Name("__nnsight_step__", ast.Store())
            # The `with` form of older versions runs as the `for` loop it means, warning as it
            # starts (at run time, so each run of a cached block warns as Python's filters say).
            steps = _loc(
                ast.Call(func=ast.Attribute(ast.Name(RT, ast.Load()), "block_form_steps", ast.Load()),
                         args=[item.context_expr], keywords=[]),
                item.context_expr,  # not `node`: a method call spanning the body would report its last line
            )
            return _ending_loop(ast.For(target=target, iter=steps, body=node.body, orelse=[]), node)
        return node

    def visit_For(self, node):
        node = self.generic_visit(node)
        if _call_attr(node.iter) in ("iter", "all"):
            return _ending_loop(ast.For(target=node.target, iter=node.iter, body=node.body, orelse=node.orelse), node)
        return node


def _ending_loop(loop: ast.For, where) -> ast.For:
    """``for step in tracer.iter[...]:`` (a new node, at ``where``) whose body ends the loop when
    the model makes no more calls."""
    handler = ast.ExceptHandler(
        type=ast.Attribute(ast.Name(RT, ast.Load()), "LoopEnd", ast.Load()), name=None, body=[ast.Break()]
    )
    loop.body = [ast.Try(body=loop.body, handlers=[handler], orelse=[], finalbody=[])]
    return _loc(loop, where)


@dataclass
class Block:
    """A captured call site: compiled code plus the caller-local names it needs."""

    code: object
    param_names: tuple[str, ...]
    filename: str
    lineno: int
    shared_names: frozenset  # names bound by invoke bodies, which later invokes may read
    trivial: bool  # only `pass` / constants: Python may run it without a line event, so it is not skipped

    def run(self, frame, runtime, save, assign):
        """Execute the eager part of the block; returns the function whose closure holds every name."""
        import types

        fn = types.FunctionType(self.code, frame.f_globals)
        if self.param_names:
            caller = frame.f_locals
            values = [caller.get(name, _UNBOUND) for name in self.param_names]
            return fn(runtime, save, assign, _UNBOUND, *values)
        return fn(runtime, save, assign, _UNBOUND)


class _Unbound:
    __slots__ = ()

    def __repr__(self):
        return "<unbound>"


_UNBOUND = _Unbound()


def _nonlocal(names):
    return [ast.Nonlocal(names=sorted(names))] if names else []


def _function(name, body, node, nonlocals, defaults=()):
    args = ast.arguments(
        posonlyargs=[],
        args=[ast.arg(arg=n) for n in defaults],
        vararg=None,
        kwonlyargs=[],
        kw_defaults=[],
        kwarg=None,
        defaults=[ast.Name(n, ast.Load()) for n in defaults],
    )
    fn = ast.FunctionDef(
        name=name, args=args, body=_nonlocal(nonlocals) + body, decorator_list=[], returns=None
    )
    if sys.version_info >= (3, 12):
        fn.type_params = []
    return _loc(fn, node)


class _InvokeRewriter(_Transformer):
    """Rewrites each ``with x.invoke(...)`` into a registered body function.

    Scoping follows what each invoke's code means where it was written:
    a name an invoke assigns is its own (two invokes may both loop over ``i``),
    unless another invoke reads it without assigning it (a cross-invoke value,
    shared through the block function's cell) or the eager code assigned it.
    Names the eager code binds and an invoke only reads (loop variables) are
    frozen when the invoke is written. Each invoke publishes its own names when it
    ends, so saved values reach the caller.
    """

    def __init__(self, uses, shared, eager_assigned):
        self.uses = uses
        self.shared = shared
        self.eager_assigned = eager_assigned
        self.count = 0

    def visit_FunctionDef(self, node):
        return node

    visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = visit_FunctionDef

    def visit_With(self, node):
        if not _is_invoke(node):
            return self.generic_visit(node)
        n = self.count
        self.count += 1
        use = self.uses[n]
        invoker_name = f"__nnsight_invoker_{n}__"
        snapshot = sorted((self.eager_assigned - use.assigned) & use.loaded)
        nonlocals = (use.assigned & (self.eager_assigned | self.shared)) - use.globals
        publish = ast.Expr(
            ast.Call(
                func=ast.Attribute(ast.Name(RT, ast.Load()), "publish", ast.Load()),
                args=[ast.Call(func=ast.Name("locals", ast.Load()), args=[], keywords=[])],
                keywords=[],
            )
        )
        body = [
            ast.Try(
                body=_rewrite(node.body), handlers=[], orelse=[], finalbody=[publish]
            )
        ]
        fn_name = f"__nnsight_invoke_{n}__"
        item = node.items[0]
        prefix = []
        if item.optional_vars is not None:
            prefix.append(_loc(ast.Assign(targets=[item.optional_vars], value=ast.Name(invoker_name, ast.Load())), node))
        register = _loc(
            ast.Expr(
                ast.Call(
                    func=ast.Attribute(ast.Name(invoker_name, ast.Load()), "set_body", ast.Load()),
                    args=[ast.Name(fn_name, ast.Load())],
                    keywords=[],
                )
            ),
            node,
        )
        new_with = ast.With(
            items=[ast.withitem(context_expr=item.context_expr, optional_vars=ast.Name(invoker_name, ast.Store()))],
            body=prefix + [_function(fn_name, body, node, nonlocals, snapshot), register],
        )
        return _loc(new_with, node)


def _build(with_node: ast.With, caller_locals: set[str], filename: str, compile_fn=None, future_flags=0) -> tuple[object, tuple[str, ...], bool]:
    """Compile ``with_node``'s body (left unchanged: the rewriters copy what they change)."""
    body = with_node.body
    whole = _Scan(filename)
    plain = []
    for stmt in body:
        whole.rewrites = False
        whole.visit(stmt)
        plain.append(not whole.rewrites)
    all_assigned = whole.assigned - whole.globals
    referenced = whole.assigned | whole.loaded
    params = tuple(sorted(referenced & caller_locals))
    has_invokes = whole.invokes
    invokes_assigned = set()

    stmts: list[ast.stmt] = []
    # A caller variable not yet bound must stay unbound. Without invokes, one the body only
    # ever assigns can keep the placeholder: nothing reads it, and read_scope leaves it out.
    unbound_checked = params if has_invokes else [n for n in params if n in whole.loaded or n in whole.needs_bound]
    for name in unbound_checked:
        stmts.append(
            ast.If(
                test=ast.Compare(ast.Name(name, ast.Load()), [ast.Is()], [ast.Name(UNBOUND, ast.Load())]),
                body=[ast.Delete([ast.Name(name, ast.Del())])],
                orelse=[],
            )
        )
    local_only = sorted(all_assigned - set(params))
    if local_only:  # makes them locals of the block function without binding them
        stmts.append(
            ast.If(
                test=ast.Constant(False),
                body=[ast.Assign(targets=[ast.Name(n, ast.Store()) for n in local_only], value=ast.Constant(None))],
                orelse=[],
            )
        )

    if has_invokes:
        eager = _names(body, skip_invokes=True)
        invokes = [n for stmt in body for n in ast.walk(stmt) if _is_invoke(n)]
        uses = [_names(n.body) for n in invokes]
        reads_first = [_reads_before_assigning(n.body) for n in invokes]
        shared = set()
        for k, use in enumerate(uses):
            for j in range(len(uses)):
                if j != k:
                    shared |= use.assigned & reads_first[j]
        invokes_assigned = set().union(*(use.assigned for use in uses))
        rewriter = _InvokeRewriter(uses, shared, eager.assigned - eager.globals)
        stmts += _rewrite(body, rewriter)
    else:
        rewritten = _rewrite(body, plain=plain)
        stmts.append(_function("__nnsight_invoke__", rewritten, with_node, all_assigned))
        stmts.append(
            ast.Expr(
                ast.Call(
                    func=ast.Attribute(ast.Name(RT, ast.Load()), "implicit_invoke", ast.Load()),
                    args=[ast.Name("__nnsight_invoke__", ast.Load())],
                    keywords=[],
                )
            )
        )
        # The body reads every parameter and declares every name it assigns nonlocal, so the
        # invoke's own closure holds every name: it is the scope (one function less to compile).
        stmts.append(ast.Return(ast.Name("__nnsight_invoke__", ast.Load())))
    if has_invokes:
        everything = set(params) | all_assigned
        stmts.append(_function("__nnsight_scope__", [ast.Pass()], with_node, everything))
        stmts.append(ast.Return(ast.Name("__nnsight_scope__", ast.Load())))

    fn = ast.FunctionDef(
        name="__nnsight_block__",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(arg=a) for a in (RT, SAVE, ASSIGN, UNBOUND, *params)],
            vararg=None,
            kwonlyargs=[],
            kw_defaults=[],
            kwarg=None,
            defaults=[],
        ),
        body=stmts,
        decorator_list=[],
        returns=None,
    )
    if sys.version_info >= (3, 12):
        fn.type_params = []
    _loc(fn, with_node)  # every node generated here: the user's own statements keep their lines
    module = ast.Module(body=[fn], type_ignores=[])
    if compile_fn is not None:
        code = compile_fn(module, filename)
    else:  # the user's own `from __future__` imports, not this module's
        code = compile(module, filename, "exec", flags=future_flags, dont_inherit=True)
    block_code = next(c for c in code.co_consts if getattr(c, "co_name", None) == "__nnsight_block__")
    return block_code, params, frozenset(invokes_assigned)


def _fresh_with(lines, node: ast.With, filename: str) -> ast.With:
    """A private parse of the ``with`` statement ``node`` (cheaper than copying the shared tree)."""
    text = "".join(lines[node.lineno - 1 : node.end_lineno])
    if node.col_offset:  # an indented statement parses as the body of an `if` on the line before it
        source = "\n" * (node.lineno - 2) + "if 1:\n" + text
        return ast.parse(source, filename).body[0].body[0]
    return ast.parse("\n" * (node.lineno - 1) + text, filename).body[0]


# The compiler flags of `from __future__ import ...` (a block compiles with its own file's).
_FUTURE_FLAGS = sum({getattr(__future__, name).compiler_flag for name in __future__.all_feature_names})


class CapturedBlock:
    """One ``with`` statement of the user's source, found from the frame executing it.

        block = capture(frame)            # cached per call site
        block.body_source()               # the body's text, with the user's line numbers
        block.names.loaded                # names the body reads (assigned: names it binds)
        block.compiled().run(frame, ...)  # the local engine's compiled copy

    Attributes:
        filename, lineno   where the ``with`` statement is
        node               its ``ast.With`` (shared with the cache: do not modify)
        trivial            the body is only ``pass`` / constants: Python may run it without a
                           line event, so it is not skipped and needs no run of its own
        module_level       written at module level (no caller locals to pass in)
    """

    __slots__ = (
        "filename", "lineno", "node", "trivial", "module_level", "_lines", "_caller_locals", "_compile_fn",
        "_future_flags", "_compiled", "_names",
    )

    def __init__(self, filename, node, lines, caller_locals, module_level, compile_fn, future_flags=0):
        self.filename = filename
        self.lineno = node.lineno
        self.node = node
        self.module_level = module_level
        self.trivial = all(
            isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
            for stmt in node.body
        )
        self._lines = lines
        self._caller_locals = caller_locals
        self._compile_fn = compile_fn
        self._future_flags = future_flags
        self._compiled = None
        self._names = None

    def body_source(self) -> str:
        """The body's lines as written (``body_lineno`` is the first one's number)."""
        return "".join(self._lines[self.body_lineno - 1 : self.node.end_lineno])

    @property
    def body_lineno(self) -> int:
        first = self.node.body[0]  # a decorated def/class starts at its first decorator
        return min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", ())])

    @property
    def names(self) -> "_NameUse":
        if self._names is None:
            self._names = _names(self.node.body)
        return self._names

    def skip(self, frame) -> "BodySkipper | None":
        """Make Python skip the body ``frame`` is about to run; ``restore()`` the result in ``__exit__``."""
        return None if self.trivial else BodySkipper(frame, self.body_lineno)

    def skipped(self, exc_type) -> bool:
        """Whether ``__exit__`` was reached by skipping the body (so the block is ours to run)."""
        return exc_type is SkipBlock or (exc_type is None and self.trivial)

    def compiled(self) -> Block:
        """The body compiled for the local engine (once per call site)."""
        if self._compiled is None:
            # A scope's own compiler may change the tree it is given: it gets a private one.
            node = self.node if self._compile_fn is None else _fresh_with(self._lines, self.node, self.filename)
            code, params, shared = _build(node, self._caller_locals, self.filename, self._compile_fn, self._future_flags)
            self._compiled = Block(code, params, self.filename, self.lineno, shared, self.trivial)
        return self._compiled


class SourceCache:
    """Parsed source files and captured blocks, bounded, least recently used evicted first.

        cache = SourceCache(max_files=64, max_blocks=4096)
        block = cache.capture(frame)
        cache.forget("<nnsight-remote:job1")    # drop every file whose name starts so

    A notebook makes a new "file" per edited cell and a server one per job, so both
    maps are bounded; an evicted entry is simply parsed again when next needed.
    """

    def __init__(self, max_files: int = 64, max_blocks: int = 4096):
        import threading

        self.max_files = max_files
        self.max_blocks = max_blocks
        self._lock = threading.Lock()  # traces in several threads share the cache
        self._files = LRU(max_files)  # (filename, text hash) -> (lines, with index): files parsed whole
        self._blocks = LRU(max_blocks)  # (code object, filename, line) -> CapturedBlock

    def __len__(self):
        return len(self._blocks)

    def capture(self, frame) -> CapturedBlock:
        """The block of the ``with`` statement ``frame`` is executing."""
        with self._lock:
            return self._capture(frame)

    def _capture(self, frame) -> CapturedBlock:
        code = frame.f_code
        # Code objects compare by value, not by file: two files with the same code must not share a block.
        key = (code, code.co_filename, frame.f_lineno)
        block = self._blocks.get(key)
        if block is not None:
            return block
        filename = code.co_filename
        lines = _source_lines(filename, frame)
        # Each block is parsed on its own (tens of µs; a long script's whole parse costs tens
        # of ms). Only where its own lines do not give the statement is the file parsed, once.
        node = _with_at(code, frame.f_lineno, lines, filename)
        if node is None:
            lines, index = self._file((filename, hash(tuple(lines))), lines)
            node = _find_with(index, frame.f_lineno, filename)
        else:
            _check_own_lines(node, filename, frame.f_lineno)
        _check_first_statement(node, filename)
        module_level = frame.f_locals is frame.f_globals
        caller_locals = set() if module_level else set(code.co_varnames) | set(code.co_cellvars) | set(code.co_freevars)
        # A scope may supply its own compiler (the remote server's sandbox does).
        block = CapturedBlock(
            filename, node, lines, caller_locals, module_level, frame.f_globals.get(COMPILE_HOOK),
            code.co_flags & _FUTURE_FLAGS,
        )
        return self._blocks.put(key, block)

    def _file(self, key, lines):
        known = self._files.get(key)
        if known is not None:
            return known
        tree = ast.parse("".join(lines), key[0])
        return self._files.put(key, (lines, _with_index(tree)))

    def filenames(self) -> set[str]:
        """The files that hold a captured block now."""
        return {filename for _, filename, _ in self._blocks} | {name for name, _ in self._files}

    def forget(self, filename_prefix: str):
        """Drop every file and block whose file name starts with ``filename_prefix``."""
        with self._lock:
            self._forget(filename_prefix)

    def _forget(self, filename_prefix: str):
        self._files.drop(lambda key: key[0].startswith(filename_prefix))
        self._blocks.drop(lambda key: key[1].startswith(filename_prefix))


blocks = SourceCache()  # the process's cache of captured call sites


def capture(frame) -> CapturedBlock:
    """``blocks.capture(frame)``: the captured ``with`` statement ``frame`` is executing."""
    return blocks.capture(frame)


_CO_OPTIMIZED = 0x1

if sys.version_info < (3, 13):
    import ctypes

    # Writes a frame's f_locals dict back into its fast locals (what a debugger does).
    # Our own prototype, so the shared ctypes.pythonapi entry is left as it is.
    _locals_to_fast = ctypes.PYFUNCTYPE(None, ctypes.py_object, ctypes.c_int)(("PyFrame_LocalsToFast", ctypes.pythonapi))


def bind(frame, values: dict):
    """Bind ``values`` as variables of ``frame`` (the scope the ``with`` block was written in)."""
    if not values:
        return
    if frame.f_code.co_flags & _CO_OPTIMIZED:
        if sys.version_info >= (3, 13):
            for name, value in values.items():
                frame.f_locals[name] = value
        else:
            snapshot = frame.f_locals  # the frame keeps this dict: it must not keep the values too
            snapshot.update(values)
            _locals_to_fast(frame, 0)
            for name in values:
                snapshot.pop(name, None)
    else:
        frame.f_locals.update(values)


_RUNTIME_NAMES = frozenset((RT, SAVE, ASSIGN, UNBOUND))  # the block function's own parameters


def read_scope(scope_fn) -> dict:
    """Current values of every name of a finished block (unbound names are left out)."""
    values = {}
    closure = scope_fn.__closure__
    if closure:
        for name, cell in zip(scope_fn.__code__.co_freevars, closure):
            if name in _RUNTIME_NAMES:
                continue
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if value is not _UNBOUND:  # a caller variable the block left unbound
                values[name] = value
    return values
