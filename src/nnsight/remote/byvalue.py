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

import os
import sys
import sysconfig
import types


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
