"""Envoys: a mirror of a module tree whose ``.output`` / ``.input`` reach the running model.

    model = NNsight(net)
    model.transformer.h[0].attn          # an Envoy for net.transformer.h[0].attn
    model.transformer.h[0].attn.embed_dim  # plain attributes pass through
    with model.trace(x):
        hs = model.transformer.h[0].output.save()

Options on every envoy:
    .output / .input / .inputs   read or replace the module's values (inside a trace)
    .skip(value)                 do not run the module; use ``value`` as its output
    .next()                      the module's next call (modules called several times per forward)
    envoy(*args)                 run the module on other values, ad hoc, inside or outside a trace
    .path                        dotted path from the root, e.g. ``model.transformer.h.0``

The root (``NNsight``) decides two things about the tree, once, when it is built:
    rename   aliases for module paths (``tracing/aliases.py``): ``model.layers[0].ffn``
    envoys   the class wrapping each module: an ``Envoy`` subclass for all, or a dict keyed
             by module class (matched through the MRO, first) or by path string (its last
             components, ``*`` for any one, aliases honoured); unmatched modules get ``Envoy``
"""

from __future__ import annotations

import weakref

import torch

from .deprecation import warn_deprecated
from .errors import NotInTraceError
from .interleaver import current_mediator
from .tracer import StepIndexer, StepLoop
from .values import ValueAccess


def _labelled_repr(aliases, module, parts) -> str:
    """``repr(module)`` as torch prints it, with each child labelled ``alias/name`` and
    aliases that reach further down listed at the end, as nnsight 0.8.1 prints them."""
    bound = aliases.aliases_of(parts)
    labels = {}
    extra = []
    for alias, target in bound.items():
        if target[:-1] == parts:
            labels.setdefault(target[-1], []).append(alias)
        else:
            extra.append((alias, target))
    entries = []
    for name, child in module._modules.items():
        if child is None:
            continue
        label = "/".join(labels.get(name, []) + [name])
        entries.append([label, _labelled_repr(aliases, child, parts + (name,)), 1])
    if isinstance(module, torch.nn.ModuleList):  # torch groups repeated blocks: (0-1): 2 x Block(...)
        grouped = []
        for label, text, _ in entries:
            if grouped and grouped[-1][1] == text and label.isdigit() and grouped[-1][3].isdigit():
                grouped[-1][2] += 1
                grouped[-1][0] = f"{grouped[-1][3]}-{label}"
            else:
                grouped.append([label, text, 1, label])
        entries = [[g[0], (f"{g[2]} x " + g[1]) if g[2] > 1 else g[1], 1] for g in grouped]
    for alias, target in extra:
        entries.append([alias, _labelled_repr(aliases, _module_at(module, target[len(parts):]), target), 1])
    extra_lines = module.extra_repr().split("\n") if module.extra_repr() else []
    lines = extra_lines + [f"({label}): " + _indent(text) for label, text, _ in entries]
    main = module._get_name() + "("
    if lines:
        if len(extra_lines) == 1 and not entries:
            main += extra_lines[0]
        else:
            main += "\n  " + "\n  ".join(lines) + "\n"
    return main + ")"


def _module_at(module, parts):
    for part in parts:
        module = module._modules[part]
    return module


def _indent(text: str) -> str:
    first, *rest = text.split("\n")
    return "\n".join([first] + ["  " + line for line in rest])


def _display(path: str) -> str:
    """``model.transformer.h.0.attn`` -> ``model.transformer.h[0].attn``."""
    parts = path.split(".")
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


class TreeOptions:
    """What the root decides for every envoy of its tree: aliases and envoy classes (see module docstring)."""

    def __init__(self, aliases=None, envoys=None):
        self.aliases = aliases  # an AliasTable, or None
        self.envoys = envoys

    @staticmethod
    def check_envoys(envoys):
        if envoys is None:
            return None
        if isinstance(envoys, type):
            if not issubclass(envoys, Envoy):
                raise TypeError(f"envoys= must be an Envoy subclass or a dict of them, not {envoys.__name__}")
            return envoys
        if not isinstance(envoys, dict):
            raise TypeError(f"envoys= must be an Envoy subclass or a dict of them, not {type(envoys).__name__}")
        for key, cls in envoys.items():
            if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, torch.nn.Module))):
                raise TypeError(f"envoys= keys are module classes or path names, not {key!r}")
            if not (isinstance(cls, type) and issubclass(cls, Envoy)):
                raise TypeError(f"envoys[{key!r}] must be an Envoy subclass, not {cls!r}")
        return dict(envoys)

    def envoy_class(self, module, parts) -> type:
        envoys = self.envoys
        if envoys is None:
            return Envoy
        if isinstance(envoys, type):
            return envoys
        for cls in type(module).__mro__:  # class keys win over names
            if cls in envoys:
                return envoys[cls]
        spellings = self.aliases.spellings(parts) if self.aliases is not None else [parts]
        for key, cls in envoys.items():
            if isinstance(key, str):
                wanted = tuple(p for p in key.split(".") if p)
                for spelled in spellings:
                    tail = spelled[len(spelled) - len(wanted) :] if len(spelled) >= len(wanted) else None
                    if tail is not None and all(w in ("*", c) for w, c in zip(wanted, tail)):
                        return cls
        return Envoy


class Envoy(ValueAccess):
    """Stands in for one ``torch.nn.Module`` of the traced model.

        model = Envoy(net, rename={"layers": "blocks"})   # a root: the same as NNsight(net, ...)
        with model.trace(x):
            out = model.output.save()
    """

    def __new__(cls, *args, **kwargs):
        # nnsight 0.8.1 builds the tree from one class, so ``Envoy(module)`` there is a root that
        # traces. Here the root is ``NNsight``: an ``Envoy`` made with no root is one.
        if cls is Envoy and len(args) == 1 and not kwargs.keys() & {"path", "root", "parent"}:
            from ..modeling.base import NNsight

            return super().__new__(NNsight)
        return super().__new__(cls)

    def __init__(self, module: torch.nn.Module, path: str = "model", root: "Envoy | None" = None, parent=None):
        # Every envoy shares its root's options, so a child held after the model is dropped
        # (``NNsight(net).layer``) still builds its own children.
        object.__setattr__(self, "_tree", TreeOptions() if root is None else root._tree)
        object.__setattr__(self, "_module", module)
        # Parent and root links are weak: the tree below a root is owned by the root alone, so
        # dropping the last user reference to the model frees it by reference counting (no cycle
        # for the cyclic collector to find), as in nnsight 0.8.1.
        object.__setattr__(self, "_parent_ref", weakref.ref(parent) if parent is not None else None)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_display", _display(path))
        object.__setattr__(self, "_root_ref", weakref.ref(root if root is not None else self))
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_hook", None)  # the tracing engine's ModuleHook, reused across traces

    # -- tree --------------------------------------------------------------

    def _parts(self) -> tuple:
        """The real module path below the root, as components."""
        return tuple(self._path.split(".")[1:])

    def _child(self, name: str) -> "Envoy":
        child = self._children.get(name)
        module = self._module._modules[name]
        if child is None or child._module is not module:
            cls = self._tree.envoy_class(module, self._parts() + (name,))
            # Built from this envoy (alive here) and then pointed at the root, which may be gone
            # already when the root was a temporary: ``NNsight(net).transformer.h``.
            child = cls(module, f"{self._path}.{name}", self, self)
            object.__setattr__(child, "_root_ref", self._root_ref)
            self._children[name] = child
        return child

    def _at(self, parts) -> "Envoy":
        """The envoy at a real path below this one."""
        envoy = self
        for part in parts:
            envoy = envoy._child(part)
        return envoy

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module = self._module
        if name in module._modules and module._modules[name] is not None:
            return self._child(name)
        aliases = self._tree.aliases
        if aliases is not None:
            target = aliases.target(self._parts(), name)
            if target is not None:
                return self._root._at(target)
        try:
            value = getattr(module, name)
        except AttributeError:
            pass
        else:
            if isinstance(value, torch.nn.Module):
                return self._envoy_of_attribute(name, value)
            return value
        if name in ("device", "devices"):
            # For a module that has no such attribute of its own (a plain torch module; a
            # transformers model has .device): where its parameters are, as in nnsight 0.8.1.
            devices = {p.device for p in module.parameters()}
            if name == "devices":
                return devices
            first = next(module.parameters(), None)
            return first.device if first is not None else None
        children = [n for n, m in module._modules.items() if m is not None]
        if aliases is not None:
            children += [f"{a} (alias)" for a in aliases.aliases_of(self._parts())]
        # Docs often write `model.layers` for a model whose layers sit one level down.
        # Two levels down at most: a failed hasattr() must stay cheap on a model of thousands of modules.
        deeper = [
            f"{child_name}.{name}"
            for child_name, child in module._modules.items()
            if child is not None and child._modules.get(name) is not None
        ]
        hint = f" A module of that name is further down: {', '.join(f'{self._display}.{p}' for p in deeper)}." if deeper else ""
        raise AttributeError(
            f"{self._display} ({type(module).__name__}) has no module or attribute {name!r}. "
            + (f"Its child modules are: {', '.join(children)}." if children else "It has no child modules.")
            + hint
        ) from None

    def _envoy_of_attribute(self, name: str, module: torch.nn.Module) -> "Envoy":
        """The envoy of a module reached by a plain attribute (a property, or a module stored
        without registering it), so its ``.output`` can be read like a child's (as in nnsight 0.8.1).

        A module of the tree (``base_model`` returning the model itself or one of its children)
        is its one envoy, at its own path; any other one gets an envoy at ``<path>.<name>``.
        """
        if module is self._module:
            return self
        root = self._root
        for path, found in root._module.named_modules():
            if found is module:
                return root._at(path.split(".")) if path else root
        extras = self.__dict__.get("_attribute_envoys")
        if extras is None:
            extras = {}
            object.__setattr__(self, "_attribute_envoys", extras)
        envoy = extras.get(name)
        if envoy is None or envoy._module is not module:
            cls = self._tree.envoy_class(module, self._parts() + (name,))
            envoy = cls(module, f"{self._path}.{name}", self, self)
            object.__setattr__(envoy, "_root_ref", self._root_ref)
            extras[name] = envoy
        return envoy

    def __setattr__(self, name, value):
        if name in ("output", "input", "inputs") or hasattr(type(self), name) or name.startswith("_"):
            if name == "_hook":  # the engine's per-envoy hook cache
                object.__setattr__(self, name, value)
                return
            object.__setattr__(self, name, value)
        else:
            # A module here (new or replacing a child) lands on the torch module; the child
            # envoy is rebuilt on the next access, since it no longer wraps that module.
            setattr(self._module, name, value)

    def _child_names(self) -> list:
        """The names of the children a torch container indexes (a ``None`` entry is not one)."""
        modules = self._module._modules
        if None in modules.values():
            return [n for n, m in modules.items() if m is not None]
        return list(modules)  # in C: an 80-layer model's `h[i]` costs no Python loop

    def __getitem__(self, key):
        names = self._child_names()
        if isinstance(key, slice):
            return [self._child(n) for n in names[key]]
        if isinstance(key, str):
            return self.get(key)
        try:
            index = int(key)
        except TypeError:
            raise TypeError(f"{self._display} indices must be integers or slices, not {type(key).__name__}") from None
        if not -len(names) <= index < len(names):
            raise IndexError(
                f"{self._display} ({type(self._module).__name__}) has {len(names)} modules; "
                f"index {index} is out of range (valid: {-len(names)} to {len(names) - 1})"
            )
        return self._child(names[index])

    def __len__(self):
        return len(self._child_names())

    def __bool__(self):
        # As true as the module: ``if model.layer:`` holds for a leaf (no children, so
        # ``__len__`` alone would make it false), an empty ModuleList stays false.
        return bool(self._module)

    def __iter__(self):
        return iter(self[:])

    def __contains__(self, name):
        if name in self._module._modules:
            return True
        aliases = self._tree.aliases
        return aliases is not None and aliases.target(self._parts(), name) is not None

    def get(self, path: str) -> "Envoy":
        """``model.get("transformer.h.0.mlp")`` — the envoy at a dotted path from here."""
        prefix = self._path + "."
        if path.startswith(prefix):
            # "model.layers.0" on a root whose child is called "model" (Llama) is a path below
            # that child; otherwise the root's own name is just spelled out.
            try:
                return self._walk(path)
            except (AttributeError, IndexError):
                path = path[len(prefix) :]
        return self._walk(path)

    def _walk(self, path: str) -> "Envoy":
        envoy = self
        for part in path.split(".") if path else []:
            if part in envoy._module._modules:
                envoy = envoy._child(part)
            elif part.lstrip("-").isdigit():
                envoy = envoy[int(part)]
            else:
                envoy = getattr(envoy, part)
        return envoy

    def modules(self, include_fn=None, names=False):
        """Every envoy of this subtree, children before their parent, a shared module once (as nnsight 0.8.1).

            model.modules()[-1] is model
            model.modules(lambda e: isinstance(e._module, torch.nn.Linear), names=True)   # [(path, envoy), ...]

        ``include_fn`` keeps only the envoys it returns true for; ``names=True`` gives
        ``(path, envoy)`` pairs.
        """
        found = []
        self._post_order(set(), include_fn, names, found)
        return found

    def _post_order(self, seen: set, include_fn, names: bool, found: list) -> None:
        # A method, not a closure that calls itself: such a closure is a reference cycle that
        # keeps the model alive until the garbage collector runs.
        if id(self._module) in seen:
            return
        seen.add(id(self._module))
        for name, module in self._module._modules.items():
            if module is not None:
                self._child(name)._post_order(seen, include_fn, names, found)
        if include_fn is None or include_fn(self):
            found.append((self.path, self) if names else self)

    def named_modules(self, include_fn=None):
        """``(path, envoy)`` pairs: ``modules(include_fn, names=True)``."""
        return self.modules(include_fn, names=True)

    def _subtree(self) -> list:
        """This envoy and every one below it, each before its children (the order modules start running)."""
        found = [self]
        for name, module in self._module._modules.items():
            if module is not None:
                found.extend(self._child(name)._subtree())
        return found

    @property
    def _parent(self) -> "Envoy | None":
        ref = self._parent_ref
        return ref() if ref is not None else None

    @property
    def _root(self) -> "Envoy":
        root = self._root_ref()
        if root is None:
            raise ReferenceError(f"{self._display}: the model this envoy belongs to has been freed")
        return root

    @property
    def parent(self) -> "Envoy | None":
        """The envoy this one is a child of (``None`` on the root)."""
        return self._parent

    @property
    def root(self) -> "Envoy":
        """The model's envoy, the top of the tree."""
        return self._root

    def children(self):
        return self[:]

    def named_children(self):
        return [(n, self._child(n)) for n, m in self._module._modules.items() if m is not None]

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self):
        aliases = self._tree.aliases
        if aliases is None:
            return repr(self._module)
        return _labelled_repr(aliases, self._module, self._parts())

    def __dir__(self):
        names = set(super().__dir__()) | set(self._module._modules) | set(dir(self._module))
        aliases = self._tree.aliases
        if aliases is not None:
            names |= set(aliases.aliases_of(self._parts()))
        return sorted(names)

    # -- values of the running model ----------------------------------------

    def _key(self):
        return id(self._module)

    def _new_hook(self):
        from .interleaver import ModuleHook

        return ModuleHook(self._module, self._display, self._path)

    @property
    def source(self):
        """The module's forward with every call site named; ``.source.<name>.output`` inside a trace."""
        accessor = self.__dict__.get("_source_accessor")
        if accessor is None:
            from .source import SourceAccessor

            accessor = SourceAccessor(self)
            object.__setattr__(self, "_source_accessor", accessor)
        return accessor

    def _mediator(self, what: str):
        mediator = current_mediator()
        if mediator is None:
            from .tracer import setup_error  # (tracer imports this module)

            error = setup_error(f"{self._display}.{what}")
            if error is not None:
                raise error
            raise NotInTraceError(
                f"{self._display}.{what} was accessed outside of a trace (outside of interleaving: no model "
                f"is running). Module values exist only while "
                f"the model runs: read them inside `with model.trace(...):` (or inside a "
                f"`with tracer.invoke(...):` block when the trace has explicit invokes)."
            )
        return mediator

    def skip(self, value):
        """Do not run this module in the current call; the model sees ``value`` as its output."""
        self._mediator("skip()").skip(self, value)

    def next(self):
        """``m.next().output``: the module's next call, even while its current one is being read."""
        self._mediator("next()").next_call(self)
        return self

    @property
    def iter(self):
        """Deprecated: ``model.iter[...]`` is ``tracer.iter[...]`` (write that)."""
        warn_deprecated("model.iter", "tracer.iter")
        return StepIndexer()

    def all(self):
        """Deprecated: ``model.all()`` is ``tracer.all()`` (write that)."""
        warn_deprecated("model.all()", "tracer.all()")
        return StepLoop(slice(None))

    def __call__(self, *args, hook: bool = False, **kwargs):
        """Run the module on other values, ad hoc (``model.lm_head(hs)``).

        hook   False (default): the call is invisible to the trace (it does not count as one
               of the module's calls, nothing is served). True: the trace sees it like a call
               of the model, so other invokes and persistent edits can read and edit the
               values of this module and the modules under it (an SAE or adapter attached to
               the tree that the forward itself never calls).
        """
        mediator = current_mediator()
        if mediator is None:
            return self._module(*args, **kwargs)
        interleaver = mediator.interleaver
        if hook:
            # While this body runs the module, it is the model side: the invokes the call
            # serves hand control back here, not to the model's own loop.
            import greenlet

            previous = interleaver.main
            interleaver.main = greenlet.getcurrent()
            try:
                return self._module(*args, **kwargs)
            finally:
                interleaver.main = previous
        # Running a module ad hoc must not count as one of its calls in the traced forward.
        interleaver.bypass += 1
        try:
            return self._module(*args, **kwargs)
        finally:
            interleaver.bypass -= 1
