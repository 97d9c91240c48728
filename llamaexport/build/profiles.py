"""Hardware profiles: data files (TOML) describing a target device."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

from llamaexport import LlamaExportError, whole_number
from llamaexport.build.recipe import PRECISIONS

PROFILE_DIR = Path(__file__).parents[1] / "data" / "profiles"  # the bundled TOML files
BACKENDS = ("onnxruntime", "tensorrt")
DEFAULT_WORKSPACE_GB = 4.0  # TensorRT's builder and runtime workspace when [builder] sets none
RUNTIME_KEYS = {"threads", "device"}
DEVICES = ("cpu", "cuda")  # [runtime] device of an onnxruntime profile (TensorRT profiles are cuda)
BUILDER_KEYS = {"workspace_gb", "builder_optimization_level"}


def _number(v) -> bool:
    """A finite int or float (TOML's nan, inf and true are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass
class Profile:
    name: str
    backend: str
    memory_gb: float
    memory_bandwidth_gbs: float
    precisions: list[str]
    default_context: int
    description: str = ""
    reserved_gb: float = 0.0
    shared_memory: bool = False
    compute_capability: str | None = None  # TensorRT: the GPU an engine for this profile runs on
    tensorrt_version: str | None = None  # TensorRT: the version the target runs ("10.3" on JetPack 6); picks the
                                         # graph of an --export-only build (recipe.kv_cache_for)
    default_batch: int = 1
    builder: dict = dataclasses.field(default_factory=dict)   # TensorRT: workspace_gb, builder_optimization_level
    runtime: dict = dataclasses.field(default_factory=dict)   # threads: CPU threads (0 = all this process may use)
    path: str = ""

    def __post_init__(self):
        where = self.path or self.name
        if self.backend not in BACKENDS:
            raise LlamaExportError(f"profile {where}: backend {self.backend!r} must be one of {', '.join(BACKENDS)}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise LlamaExportError(f"profile {where}: precisions {self.precisions} must be a non-empty subset of "
                                   f"{', '.join(PRECISIONS)}")
        if "w8a8" in self.precisions and self.backend != "tensorrt":
            raise LlamaExportError(f"profile {where}: w8a8 (int8 activations through Q/DQ) is for tensorrt profiles; "
                                   f"remove it from precisions")
        if not [p for p in self.precisions if p != "w8a8"]:
            raise LlamaExportError(f"profile {where}: precisions need at least one of fp32, fp16, int8, int4 "
                                   "besides w8a8 (the one --precision auto may choose)")
        for f in ("memory_gb", "memory_bandwidth_gbs"):
            if not _number(getattr(self, f)) or getattr(self, f) <= 0:
                raise LlamaExportError(f"profile {where}: {f} must be a positive number, got {getattr(self, f)!r}")
        for f in ("default_context", "default_batch"):
            whole_number(getattr(self, f), f"profile {where}: {f}")
        if not _number(self.reserved_gb) or not 0 <= self.reserved_gb < self.memory_gb:
            raise LlamaExportError(f"profile {where}: reserved_gb must be a number from 0 to memory_gb "
                                   f"({self.memory_gb:g}, which --memory-gb overrides), got {self.reserved_gb!r}")
        if not isinstance(self.shared_memory, bool):
            raise LlamaExportError(f"profile {where}: shared_memory must be true or false, got {self.shared_memory!r}")
        for table, keys in (("runtime", RUNTIME_KEYS), ("builder", BUILDER_KEYS)):
            unknown = sorted(set(getattr(self, table)) - keys)
            if unknown:
                raise LlamaExportError(f"profile {where}: unknown [{table}] key(s) {', '.join(unknown)}; "
                                       f"valid: {', '.join(sorted(keys))}")
        whole_number(self.runtime.get("threads", 0), f"profile {where}: [runtime] threads", at_least=0, note="0 = all cores")
        device = self.runtime.get("device", "cpu")
        if device not in DEVICES or (device == "cuda" and self.backend != "onnxruntime"):
            raise LlamaExportError(f"profile {where}: [runtime] device must be cpu or cuda (onnxruntime profiles; "
                                   f"TensorRT runs on the GPU anyway), got {device!r}")
        tv = self.tensorrt_version
        if tv is not None and not (isinstance(tv, str) and re.fullmatch(r"\d+\.\d+(\.\d+)*", tv)):
            raise LlamaExportError(f"profile {where}: tensorrt_version must be a version string like \"10.3\", got {tv!r}")
        ws = self.builder.get("workspace_gb", DEFAULT_WORKSPACE_GB)
        if not _number(ws) or not ws > 0:
            raise LlamaExportError(f"profile {where}: [builder] workspace_gb must be a positive number, got {ws!r}")

    @property
    def threads(self) -> int:
        """CPU threads for the runtime; 0 = all this process may use."""
        return int(self.runtime.get("threads", 0))

    @property
    def device(self) -> str:
        """Where the runtime runs: cpu or cuda (ONNX Runtime's CUDA provider; TensorRT profiles: cuda)."""
        return "cuda" if self.backend == "tensorrt" else self.runtime.get("device", "cpu")

    @property
    def workspace_gb(self) -> float:
        """TensorRT's workspace (planned and built with the same figure); 0 for ONNX Runtime."""
        return float(self.builder.get("workspace_gb", DEFAULT_WORKSPACE_GB)) if self.backend == "tensorrt" else 0.0

    @property
    def budget_bytes(self) -> float:
        return (self.memory_gb - self.reserved_gb) * 2**30


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str, *, memory_gb: float | None = None) -> Profile:
    """A bundled profile by name (`rtx4090`), or a path to the user's own TOML file.
    `memory_gb` overrides the profile's memory (e.g. a CPU machine with more RAM)."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise LlamaExportError(f"profile file {p} does not exist")
    else:
        p = PROFILE_DIR / f"{name_or_path}.toml"
        if not p.is_file():
            raise LlamaExportError(f"unknown profile {name_or_path!r}; valid profiles: {', '.join(profile_names())} "
                                   "(or a path to a .toml profile)")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LlamaExportError(f"profile {p} is not valid TOML: {e}") from None
    fields = {f.name for f in dataclasses.fields(Profile)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise LlamaExportError(f"profile {p}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    missing = [f.name for f in dataclasses.fields(Profile)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
    if missing:
        raise LlamaExportError(f"profile {p}: missing field(s) {', '.join(missing)}")
    if memory_gb is not None:
        data["memory_gb"] = float(memory_gb)
    try:
        return Profile(**{**data, "path": str(p)})
    except TypeError as e:
        raise LlamaExportError(f"profile {p}: {e}") from None
