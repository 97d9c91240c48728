"""llamaexport: compile LLaMA-family models into fast ONNX Runtime and TensorRT artifacts.

The package is cut by stage (each subpackage's docstring says what it owns and may import; the
directions are import-linter contracts in pyproject.toml): model -> artifact -> tensorrt ->
build | runtime -> serving | verify -> cli.

Importing this package is cheap: torch, onnx and tensorrt are imported only inside the
functions that need them, so the CPU runtime depends on numpy, onnxruntime and a tokenizer.
"""

import sys

__version__ = "0.1.0"


class LlamaExportError(Exception):
    """An error the user can fix; the CLI prints its message as one line and exits non-zero."""


def log(msg: str):
    """A line of progress or a warning on stderr, flushed at once (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


__all__ = ["LlamaExportError", "__version__", "log"]

from llamaexport import _moved  # noqa: E402  the old flat module names, forwarded (see _moved)

_moved.install()
