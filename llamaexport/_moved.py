"""The modules' old flat names (before the stage subpackages), kept importable for a release:
`import llamaexport.sampling` gives a module that forwards every attribute to
`llamaexport.runtime.sampling`, with one DeprecationWarning naming the new home."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {
    "config": "model.config", "checkpoint": "model.checkpoint", "lora": "model.lora", "tokenizer": "model.tokenizer",
    "chat": "model.chat", "manifest": "artifact.manifest", "staging": "artifact.staging", "inspect": "artifact.inspect",
    "profiles": "build.profiles", "planner": "build.planner", "recipe": "build.recipe", "quantize": "build.quantize",
    "awq": "build.awq", "export": "build.export", "onnx_graph": "build.onnx_graph", "custom_ops": "build.custom_ops",
    "trt_build": "tensorrt.builder", "trt_runtime": "tensorrt.backend", "sampling": "runtime.sampling",
    "engine": "runtime.engine", "hugepages": "runtime.hugepages", "server": "serving.server", "repl": "serving.repl",
    "parity": "verify.parity", "layerwise": "verify.layerwise", "eval": "verify.eval", "bench": "verify.bench",
}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: only names that no file answers reach it."""

    def find_spec(self, name, path=None, target=None):
        pkg, _, old = name.partition(".")
        if pkg == "llamaexport" and old in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = "llamaexport." + MOVED[spec.name.partition(".")[2]]
        warnings.warn(f"{spec.name} is now {new}; import it from there", DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        module = types.ModuleType(spec.name, target.__doc__)
        module.__getattr__ = lambda attr: getattr(target, attr)
        module.__dir__ = lambda: dir(target)
        return module

    def exec_module(self, module):
        pass


def install():
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
