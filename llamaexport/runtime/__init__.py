"""What runs on the edge device: a loaded artifact (`LlamaModel`: backends, the decode loop), sampling,
when a generation ends (`completion`), KV-cache slots, and the continuous-batching `Engine` (its
`scheduler` plans each step without a model) that `run`, `chat`, `serve` and the Python API share;
grammar masks for structured output (`constraint`: llguidance, from the `structured` extra, lazily);
lossless speculative decoding (`speculative`: prompt lookup, a draft artifact).

Needs numpy, onnxruntime and a tokenizer only. Imports `model` (config, tokenizer, chat), `artifact`
and, for a TensorRT artifact alone, `tensorrt`'s backend; never `build`, torch or onnx (import-linter
checks it).
"""

from llamaexport.runtime.engine import DoneEvent, Engine, TextEvent
from llamaexport.runtime.llama_model import Generation, LlamaModel
from llamaexport.runtime.sampling import SamplingConfig
from llamaexport.runtime.speculative import Speculation

__all__ = ["DoneEvent", "Engine", "Generation", "LlamaModel", "SamplingConfig", "Speculation", "TextEvent"]
