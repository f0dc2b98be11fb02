"""Exceptions the tracing engine raises, and tracebacks that start at the user's code."""

from __future__ import annotations

import os
import types

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_MODULE_FILE = os.path.join("torch", "nn", "modules", "module.py")


class NNsightError(Exception):
    """Base class of every error the engine raises on its own account."""


class OutOfOrderError(NNsightError, RuntimeError):
    """Code in one invoke asked for a module's value after that module had already run."""


class MissedValueError(NNsightError, RuntimeError):
    """Code asked for a module's value, but the module did not run (again) before the model finished."""


class NotInTraceError(NNsightError, RuntimeError):
    """``.output`` / ``.input`` touched where no model is running."""


def is_internal(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR) or filename.endswith(_TORCH_MODULE_FILE)


def user_traceback(tb):
    """``tb`` without the engine's own frames (and torch's module-call plumbing)."""
    frames = []
    while tb is not None:
        if not is_internal(tb.tb_frame.f_code.co_filename):
            frames.append(tb)
        tb = tb.tb_next
    result = None
    for entry in reversed(frames):
        result = types.TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result


def user_location(frame) -> str:
    """``file:line`` of the innermost frame of ``frame``'s stack that belongs to the user."""
    while frame is not None and is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"
