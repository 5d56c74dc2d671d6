# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Errors a user fixes in their input (data, slide lists, masks, paths, checkpoints, knob values), and the one line
the command-line entry points make of them.

Checks raise :class:`InputError` before any long work, naming the file and the problem. MONAI wraps an exception
raised while a config expression is evaluated in a ``RuntimeError`` of its own, so the user's one line would sit
between two tracebacks; :func:`report_input_errors` (the first step of every workflow's ``initialize`` and of every
script) installs an exception hook that prints it alone, ``error: <message>``, and the process exits with status 1.
Any other exception is a defect of ours and keeps its full traceback.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["InputError", "MissingInputError", "find_input_error", "report_input_errors"]


class InputError(ValueError):
    """Bad input, named with its file (or knob) and the problem: reported as one line, exit status 1."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the run needs does not exist."""


def find_input_error(error: BaseException | None) -> InputError | None:
    """The :class:`InputError` that caused ``error`` (itself, or along its ``__cause__`` / ``__context__`` chain)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def report_input_errors() -> None:
    """Make an uncaught :class:`InputError` print as one ``error:`` line on stderr (idempotent; exit status 1)."""
    previous = sys.excepthook
    if getattr(previous, "reports_input_errors", False):
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        found = find_input_error(error)
        if found is None:
            previous(kind, error, traceback)
        else:
            print(f"error: {found}", file=sys.stderr, flush=True)

    hook.reports_input_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
