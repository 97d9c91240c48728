"""TensorRT engine building. TensorRT is imported lazily: it is only on NVIDIA machines."""

from __future__ import annotations

from . import LlamaExportError


def require_tensorrt():
    """Import tensorrt or fail with one line saying how to proceed without it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise LlamaExportError(
            "the engine step needs TensorRT, which is not installed here (pip install tensorrt on a machine "
            "with an NVIDIA GPU); add --export-only to prepare the artifact now and run "
            "`llamaexport compile DIR` on the target") from None
    return tensorrt


def build_engine(artifact_dir, manifest, profile, *, progress=True):
    require_tensorrt()
    raise LlamaExportError("TensorRT engine building is not implemented in this version; use --export-only")
