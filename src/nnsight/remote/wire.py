"""What may cross the wire between client and server: importable modules and error types.

    from nnsight.remote.wire import IMPORTABLE_MODULES, error_class
    "torch.nn.functional" in IMPORTABLE_MODULES     # True: remote code may import it
    error_class("KeyError")                          # builtins.KeyError on the client

One list each, read by the client (what it may send, how it re-raises), the
sandbox (what remote code may import) and the server (which error types it reports
by name; any other becomes ``RemoteError`` with the original type in its message).
"""

from __future__ import annotations

import builtins

IMPORTABLE_MODULES = (
    "torch", "torch.nn", "torch.nn.functional", "torch.linalg", "torch.fft", "torch.special",
    "math", "einops", "nnsight", "functools", "dataclasses",
)

# The builtins remote code sees (besides print, hasattr, None/True/False), read by the sandbox and by
# the client deciding which annotations the server can evaluate.
SANDBOX_BUILTINS = tuple(
    "abs all any ascii bin bool callable chr complex dict divmod enumerate filter float frozenset "
    "hash hex int isinstance issubclass iter len list map max min next oct ord pow range repr "
    "reversed round set slice sorted str sum tuple zip ArithmeticError AssertionError AttributeError "
    "Exception IndexError KeyError LookupError NameError NotImplementedError OverflowError RuntimeError "
    "StopIteration TypeError ValueError ZeroDivisionError UnboundLocalError super property staticmethod "
    "classmethod".split()
)

BUILTIN_ERRORS = (
    "ArithmeticError", "AssertionError", "AttributeError", "IndexError", "KeyError", "LookupError", "NameError",
    "NotImplementedError", "OverflowError", "RuntimeError", "StopIteration", "TypeError", "ValueError",
    "ZeroDivisionError", "UnboundLocalError", "RecursionError", "MemoryError", "SyntaxError", "ImportError",
    "ModuleNotFoundError", "IndentationError", "FloatingPointError", "TimeoutError",
)
NNSIGHT_ERRORS = ("NNsightError", "OutOfOrderError", "MissedValueError", "AfterRunError", "NotInTraceError")
WIRE_ERRORS = ("SandboxError", "UnsupportedValue", "VersionMismatch")
ERROR_TYPES = frozenset(BUILTIN_ERRORS + NNSIGHT_ERRORS + WIRE_ERRORS)


class RemoteError(Exception):
    """An error on the server whose type is not one of ``ERROR_TYPES``."""


class VersionMismatch(RemoteError):
    """Client and server speak different protocol versions (the message names both)."""


def error_class(name: str) -> type:
    """The exception class a reported error type ``name`` is raised as on the client."""
    if name in BUILTIN_ERRORS:
        return getattr(builtins, name)
    if name in NNSIGHT_ERRORS:
        from ..tracing import errors

        return getattr(errors, name)
    if name == "SandboxError":
        from ..sandbox.errors import SandboxError

        return SandboxError
    if name == "UnsupportedValue":
        from .serialize import UnsupportedValue

        return UnsupportedValue
    if name == "VersionMismatch":
        return VersionMismatch
    return RemoteError
