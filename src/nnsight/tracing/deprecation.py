"""The one place nnsight warns that a spelling of older versions is deprecated.

    warn_deprecated("model.iter", "tracer.iter")              # inside the deprecated function
    warn_deprecated_at("`with tracer.iter[...]:`", "`for step in tracer.iter[...]:`", frame)

Every warning is an ``NNsightDeprecationWarning`` (a ``FutureWarning``, so Python shows it
wherever the call is, not only from ``__main__``) and names what to write instead. The
deprecated spellings keep working; nnsight 0.8.1 warns for the same ones.
``LanguageModel`` is not among them: here it is the documented class for language models.
"""

from __future__ import annotations

import warnings

from .errors import NNsightDeprecationWarning


def _message(old: str, new: str) -> str:
    # "<old> is deprecated" first: a filter's ``message=`` regex matches from the start, so one
    # written for nnsight 0.8.1's warning (which opens the same way) still matches.
    return f"{old} is deprecated (it still works): use {new} instead."


def warn_deprecated(old: str, new: str, stacklevel: int = 2) -> None:
    """Warn at the caller of the function that calls this (``stacklevel`` counts from there)."""
    # +1: this helper's own frame is not the deprecated function's.
    warnings.warn(_message(old, new), NNsightDeprecationWarning, stacklevel=stacklevel + 1)


def warn_deprecated_at(old: str, new: str, frame) -> None:
    """Warn at the line ``frame`` is executing: for spellings the engine meets while it runs the
    user's block, where no fixed number of frames up is the user's."""
    module_globals = frame.f_globals
    warnings.warn_explicit(
        _message(old, new),
        NNsightDeprecationWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__", frame.f_code.co_filename),
        # The caller's own registry, as ``warnings.warn`` uses: the "default" filter then shows
        # the warning once per line, and ``simplefilter("always")`` every time.
        registry=module_globals.setdefault("__warningregistry__", {}),
    )
