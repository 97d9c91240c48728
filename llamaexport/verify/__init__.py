"""Measuring an artifact: parity against the PyTorch reference (`check`, parity.json), each layer's
outputs (`check --layerwise`), perplexity and KL against a base run (`eval`), speed and memory (`bench`).

Imports `runtime` (what users run is what gets measured), `model` (the reference), `artifact`, and
`build`/`tensorrt` for the recipe's roles and a TensorRT debug engine.
"""

from llamaexport.verify.parity import check, format_report

__all__ = ["check", "format_report"]
