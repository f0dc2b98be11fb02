"""``rename={...}``: extra names for modules, computed once from the module tree.

    table = AliasTable(net, {"transformer.h": "layers", "mlp": "ffn"})
    table.target(("",), "layers")          # -> ("transformer", "h")
    table.target(("transformer", "h", "0"), "ffn")   # -> ("transformer", "h", "0", "mlp")
    table.spellings(("transformer", "h", "0", "mlp"))   # every way to write that path

Options of ``rename``:
    key     a dotted module path, resolved from every module of the tree ("mlp" names the
            ``mlp`` of each block; "transformer.h" only the one under the root); a ``*``
            component stands for any one child; a module class names the single direct
            child of that class. Keys that resolve nowhere are skipped, so one dict can
            serve several architectures.
    value   an alias (str) or a list of them; a dotted alias ("attn.o_proj") is bound on
            the module its prefix names.

Aliases resolve through earlier aliases ("model.layers" works once "transformer" is
"model" and "h" is "layers"). An alias that would displace a child, an attribute of
the module, or an envoy attribute (``output``...) is an error, as is one alias bound to
two different modules from the same place: there would be no way to reach the other.
The envoy path of a module stays its real path; aliases are other spellings of it.
"""

from __future__ import annotations

import torch

Path = tuple  # module path components, () for the root


class AliasTable:
    """Every alias of one model, by the module it is bound on (see module docstring)."""

    def __init__(self, module: torch.nn.Module, rename, reserved=()):
        if not isinstance(rename, dict):
            raise TypeError(f"rename must be a dict of module path -> alias, not {type(rename).__name__}")
        self._types = {_split(name): type(m) for name, m in module.named_modules()}
        self._children: dict[Path, list[str]] = {}
        for path in self._types:
            if path:
                self._children.setdefault(path[:-1], []).append(path[-1])
        self._attrs = {_split(name): m for name, m in module.named_modules()}
        self._bound: dict[Path, dict[str, Path]] = {}  # host -> alias -> target (absolute)
        self._reserved = set(reserved)
        self._spell_cache = None
        # Deepest modules first, so a key can go through the aliases of what lies below it.
        for host in sorted(self._types, key=len, reverse=True):
            for key, aliases in rename.items():
                self._bind(host, key, aliases)

    def _bind(self, host, key, aliases):
        matches = self._resolve(host, key)
        if not matches:
            return
        if len(matches) > 1:
            shown = ", ".join(".".join(m) for m in matches)
            raise ValueError(
                f"rename key {_name(key)} matches {len(matches)} modules under {_show(host)} ({shown}); "
                "an alias names one module: key them by name"
            )
        target = matches[0]
        for alias in [aliases] if isinstance(aliases, str) else list(aliases):
            if not isinstance(alias, str) or not alias:
                raise TypeError(f"rename alias for {_name(key)} must be a non-empty string, not {alias!r}")
            where = host
            if "." in alias:
                prefix, _, alias = alias.rpartition(".")
                where = host + _split(prefix)
                if target[: len(where)] != where or len(target) <= len(where):
                    raise ValueError(
                        f"rename alias {prefix + '.' + alias!r} for {_name(key)}: a dotted alias is bound on the "
                        "module its prefix names, so the prefix must start the key's path"
                    )
            self._add(where, alias, target, key)

    def _add(self, host, alias, target, key):
        if target == host + (alias,):
            return  # an alias of a module to its own name
        bound = self._bound.setdefault(host, {})
        if alias in bound:
            if bound[alias] == target:
                return
            raise ValueError(
                f"rename: {alias!r} on {_show(host)} would name both {_show(bound[alias])} and {_show(target)} "
                f"(from key {_name(key)})"
            )
        if alias in self._children.get(host, ()):
            raise ValueError(f"rename: {alias!r} is already a child module of {_show(host)}")
        if alias in self._reserved:
            raise ValueError(f"rename: {alias!r} is an envoy attribute (as in .{alias}) and cannot be an alias")
        if hasattr(self._attrs[host], alias):
            raise ValueError(f"rename: {alias!r} would hide the attribute {_show(host)}.{alias} of the module")
        bound[alias] = target

    def _resolve(self, host, key) -> list:
        if isinstance(key, type):
            return [host + (c,) for c in self._children.get(host, ()) if issubclass(self._types[host + (c,)], key)]
        if not isinstance(key, str) or not key.strip("."):
            raise TypeError(f"rename keys are module paths or module classes, not {key!r}")
        current = [host]
        for part in _split(key):
            found = []
            for path in current:
                if part == "*":
                    found += [path + (c,) for c in self._children.get(path, ())]
                elif path + (part,) in self._types:
                    found.append(path + (part,))
                elif part in self._bound.get(path, {}):
                    found.append(self._bound[path][part])
            current = found
            if not current:
                return []
        return current

    # -- queries ------------------------------------------------------------

    def target(self, host: Path, alias: str):
        """The real path ``alias`` names on the module at ``host``, or None."""
        return self._bound.get(host, {}).get(alias)

    def aliases_of(self, host: Path) -> dict:
        return dict(self._bound.get(host, {}))

    def real(self, parts) -> Path | None:
        """A path written with aliases (components), as the real path; None if it names nothing."""
        path = ()
        for part in parts:
            if path + (part,) in self._types:
                path = path + (part,)
            elif self.target(path, part) is not None:
                path = self.target(path, part)
            else:
                return None
        return path

    def spellings(self, path: Path, limit: int = 64) -> list:
        """``path`` and the ways aliases write it (for ``envoys=`` keys written in aliased names)."""
        if self._spell_cache is None:
            self._spell_cache = {}
            self._by_target: dict[Path, list] = {}
            for host, bound in self._bound.items():
                for alias, target in bound.items():
                    self._by_target.setdefault(target, []).append((host, alias))
        return self._spell(tuple(path), limit)

    def _spell(self, path, limit):
        known = self._spell_cache.get(path)
        if known is not None:
            return known
        if not path:
            found = [()]
        else:
            # The last component is either the real name (after any spelling of the parent)...
            found = [s + (path[-1],) for s in self._spell(path[:-1], limit)]
            # ...or an alias that names this very module, bound on some module above it.
            for host, alias in self._by_target.get(path, ()):
                found += [s + (alias,) for s in self._spell(host, limit)]
        found = list(dict.fromkeys(found))[:limit]
        self._spell_cache[path] = found
        return found


def _split(path: str) -> Path:
    return tuple(p for p in path.split(".") if p)


def _name(key) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


def _show(path) -> str:
    return ".".join(("model",) + tuple(path))
