"""llamaexport: compile LLaMA-family models into fast ONNX Runtime and TensorRT artifacts.

The package is cut by stage (each subpackage's docstring says what it owns and may import; the
directions are import-linter contracts in pyproject.toml): model -> artifact -> tensorrt ->
build | runtime -> serving | verify -> cli.

Importing this package is cheap: torch, onnx and tensorrt are imported only inside the
functions that need them, so the CPU runtime depends on numpy, onnxruntime and a tokenizer.
"""

import sys
from numbers import Integral

__version__ = "0.1.0"


class LlamaExportError(Exception):
    """An error the user can fix; the CLI prints its message as one line and exits non-zero."""


def whole_number(value, name: str, *, at_least: int | None = 1, at_most: int | None = None,
                 note: str | None = None) -> int:
    """`value` as an int when it is a whole number (an integer, not a bool) from `at_least` (None: no lower
    bound) up to `at_most`; else a LlamaExportError in the one shape every such check of the package uses,
    naming the parameter and what to give: "NAME must be a whole number >= 1 (NOTE), got VALUE" (or "from LO
    to HI" with both bounds)."""
    if (isinstance(value, bool) or not isinstance(value, Integral) or (at_least is not None and value < at_least)
            or (at_most is not None and value > at_most)):
        if at_least is not None and at_most is not None:
            bound = f" from {at_least} to {at_most}"
        elif at_least is not None:
            bound = f" >= {at_least}"
        else:
            bound = "" if at_most is None else f" <= {at_most}"
        raise LlamaExportError(f"{name} must be a whole number{bound}{f' ({note})' if note else ''}, got {value!r}")
    return int(value)


def log(msg: str):
    """A line of progress or a warning on stderr, flushed at once (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


__all__ = ["LlamaExportError", "__version__", "log", "whole_number"]

from llamaexport import _moved  # noqa: E402  the old flat module names, forwarded (see _moved)

_moved.install()
