"""NVIDIA's side: the tensorrt module (imported lazily, with its way-out error), the RoPE/SwiGLU plugin
library (built, found, loaded), the engine builder and the TensorRT backend the runtime runs.

Imports `llamaexport.artifact` and `llamaexport.model`, never the build stages or the runtime: the
runtime asks for the backend, the build for the engine. torch holds the backend's device memory.
"""
