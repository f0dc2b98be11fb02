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


class AfterRunError(MissedValueError, OutOfOrderError):
    """Code asked for a module's value after it had waited for ``tracer.result`` (the end of the run).

    Both a ``MissedValueError`` (the value is gone) and an ``OutOfOrderError`` (what nnsight 0.8.1
    raises when a value is asked for after the result), so code catching either keeps working.
    """


class NotInTraceError(NNsightError, RuntimeError, ValueError):
    """``.output`` / ``.input`` touched where no model is running.

    Also a ``ValueError``: nnsight 0.8.1 raises one there, so scripts catching it keep working.
    """


class SaveOutsideTraceError(NotInTraceError):
    """``nnsight.save(x)`` with no trace or session running (a ``ValueError``, as ``NotInTraceError`` is, and as in nnsight 0.8.1)."""


class InvokeError(NNsightError, ValueError):
    """An invoke that cannot run: a trace with no input and no invoke that has one, or an
    invoke opened inside another (their code runs while the model does, too late to add a row).

    Also a ``ValueError``, as nnsight 0.8.1 raises there.
    """


class NNsightDeprecationWarning(FutureWarning):
    """What nnsight warns with when a spelling of older versions still works but does nothing or changed.

        warnings.filterwarnings("ignore", category=nnsight.NNsightDeprecationWarning)

    A ``FutureWarning``, so it shows wherever the call is (as in nnsight 0.8.1).
    """


def is_internal(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR) or filename.endswith(_TORCH_MODULE_FILE)


def user_traceback(tb):
    """``tb`` without the engine's own frames.

    When the error was raised by the block's code, the model frames between the
    trace and the block (the forward that was paused to run it) are dropped too:
    what is left is the user's ``with`` line, then their own code. With the debug
    switch on (``CONFIG.APP.DEBUG`` / ``NNSIGHT_DEBUG=1``) nothing is dropped.
    """
    from ..config import debugging

    if debugging():
        return tb
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    worker_start = None
    for i, entry in enumerate(entries):
        if _is_worker_entry(entry.tb_frame.f_code):
            worker_start = i
    if worker_start is not None:
        first_internal = next((i for i, e in enumerate(entries) if is_internal(e.tb_frame.f_code.co_filename)), 0)
        entries = entries[:first_internal] + entries[worker_start:]
    kept = [e for e in entries if not is_internal(e.tb_frame.f_code.co_filename)]
    result = None
    for entry in reversed(kept):
        result = types.TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result


_WORKER_FILE = os.path.join(_PACKAGE_DIR, "tracing", "interleaver.py")


def _is_worker_entry(code) -> bool:
    """The loop every invoke body's greenlet starts in (``interleaver._Worker._loop``)."""
    return code.co_name == "_loop" and code.co_filename == _WORKER_FILE
