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
"""

from __future__ import annotations

import torch

from .errors import NotInTraceError
from .interleaver import current_mediator
from .values import ValueAccess


def _display(path: str) -> str:
    """``model.transformer.h.0.attn`` -> ``model.transformer.h[0].attn``."""
    parts = path.split(".")
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


class Envoy(ValueAccess):
    """Stands in for one ``torch.nn.Module`` of the traced model."""

    def __init__(self, module: torch.nn.Module, path: str = "model", root: "Envoy | None" = None, parent=None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_display", _display(path))
        object.__setattr__(self, "_root", root if root is not None else self)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_hook", None)  # the tracing engine's ModuleHook, reused across traces

    # -- tree --------------------------------------------------------------

    def _child(self, name: str) -> "Envoy":
        child = self._children.get(name)
        if child is None or child._module is not self._module._modules[name]:
            child = Envoy(self._module._modules[name], f"{self._path}.{name}", self._root, self)
            self._children[name] = child
        return child

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module = self._module
        if name in module._modules and module._modules[name] is not None:
            return self._child(name)
        try:
            return getattr(module, name)
        except AttributeError:
            pass
        children = [n for n, m in module._modules.items() if m is not None]
        raise AttributeError(
            f"{self._display} ({type(module).__name__}) has no module or attribute {name!r}. "
            + (f"Its child modules are: {', '.join(children)}." if children else "It has no child modules.")
        ) from None

    def __setattr__(self, name, value):
        if name in ("output", "input", "inputs") or hasattr(type(self), name) or name.startswith("_"):
            if name == "_hook":  # the engine's per-envoy hook cache
                object.__setattr__(self, name, value)
                return
            object.__setattr__(self, name, value)
        elif name in self._module._modules:
            raise AttributeError(f"cannot replace the child module {self._display}.{name} through its envoy")
        else:
            setattr(self._module, name, value)

    def __getitem__(self, key):
        names = [n for n, m in self._module._modules.items() if m is not None]
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
        return len([m for m in self._module._modules.values() if m is not None])

    def __iter__(self):
        return iter(self[:])

    def __contains__(self, name):
        return name in self._module._modules

    def get(self, path: str) -> "Envoy":
        """``model.get("transformer.h.0.mlp")`` — the envoy at a dotted path from here."""
        envoy = self
        prefix = self._path + "."
        if path.startswith(prefix):
            path = path[len(prefix) :]
        for part in path.split(".") if path else []:
            if part in envoy._module._modules:
                envoy = envoy._child(part)
            elif part.lstrip("-").isdigit():
                envoy = envoy[int(part)]
            else:
                envoy = getattr(envoy, part)
        return envoy

    def modules(self, include_self=True):
        """Every envoy below this one (module tree order)."""
        return [envoy for _, envoy in self.named_modules(include_self)]

    def named_modules(self, include_self=True):
        """``(dotted name relative to this envoy, envoy)`` pairs, like ``nn.Module.named_modules``."""
        found = [("", self)] if include_self else []
        for name, module in self._module._modules.items():
            if module is None:
                continue
            for sub, envoy in self._child(name).named_modules():
                found.append((f"{name}.{sub}" if sub else name, envoy))
        return found

    def children(self):
        return self[:]

    def named_children(self):
        return [(n, self._child(n)) for n, m in self._module._modules.items() if m is not None]

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self):
        return repr(self._module)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._module._modules) | set(dir(self._module)))

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
            raise NotInTraceError(
                f"{self._display}.{what} was accessed outside of a trace. Module values exist only while "
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

    def __call__(self, *args, **kwargs):
        mediator = current_mediator()
        if mediator is None:
            return self._module(*args, **kwargs)
        # Running a module ad hoc must not count as one of its calls in the traced forward.
        interleaver = mediator.interleaver
        interleaver.bypass += 1
        try:
            return self._module(*args, **kwargs)
        finally:
            interleaver.bypass -= 1
