"""Checkpoint -> artifact: the pipeline (`build`, `compile_artifact`), hardware profiles, the planner,
the quantization recipe and arithmetic (AWQ, GPTQ, SmoothQuant), ONNX emission with our custom ops.

Imports `model`, `artifact` and `tensorrt` (the engine step); never the runtime, so a build needs no
runtime and the runtime never drags in torch or onnx.
"""

from llamaexport.build.pipeline import build, compile_artifact

__all__ = ["build", "compile_artifact"]
