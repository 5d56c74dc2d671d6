"""InputError: found through MONAI's wrapping, printed as one line with exit status 1; other errors keep tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from custom.checkpoints import UnreadableCheckpoint
from custom.data.slide import SlideReadError
from custom.errors import InputError, MissingInputError, find_input_error


def _wrapped(error: BaseException) -> RuntimeError:
    """``error`` as MONAI's config evaluation re-raises it: ``raise RuntimeError(...) from error``, twice."""
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as middle:
        try:
            raise RuntimeError("outer") from middle
        except RuntimeError as outer:
            return outer


def test_the_input_error_is_found_under_the_wrappers_and_nothing_else_is():
    error = InputError("/data/x.png: not an image")
    assert find_input_error(_wrapped(error)) is error
    assert find_input_error(_wrapped(ValueError("a bug"))) is None
    assert find_input_error(None) is None


def test_the_input_errors_keep_the_types_callers_catch():
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(MissingInputError, ValueError)
    assert issubclass(SlideReadError, RuntimeError) and issubclass(SlideReadError, InputError)
    assert issubclass(UnreadableCheckpoint, InputError)


SCRIPT = """
import sys
from custom.errors import InputError, report_input_errors
report_input_errors()
report_input_errors()  # a second call installs nothing more
try:
    raise InputError("/data/slides.csv: row 3: unknown label 'maybe'")
except InputError as e:
    if sys.argv[1] == "input":
        raise RuntimeError("Failed to evaluate ConfigExpression") from e
raise KeyError("a defect of ours")
"""


@pytest.mark.parametrize("kind", ["input", "other"])
def test_an_uncaught_error_prints_one_line_only_for_bad_input(kind):
    result = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    if kind == "input":
        assert result.stderr == "error: /data/slides.csv: row 3: unknown label 'maybe'\n"
    else:
        assert "Traceback" in result.stderr and "KeyError: 'a defect of ours'" in result.stderr
