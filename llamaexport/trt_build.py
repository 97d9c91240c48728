"""TensorRT engine building: model.onnx -> engine.plan with a prefill and a decode profile.

TensorRT is imported lazily (only NVIDIA machines have it). The network is strongly typed:
precision lives in the ONNX graph (fp16 casts, DequantizeLinear), so there are no FP16/INT8
builder flags (TensorRT 11 removed them). Our RoPE/SwiGLU nodes become IPluginV3 layers when
libllamaexport_plugins.so is loaded (TensorRT >= 10.7), else their ONNX function bodies.

Profiles (B = the hardware profile's default_batch, L = the model's max_seq_len):
  concat KV cache (past grows by Concat):
  0 "prefill"  input_ids [1..B, 1..L]  past [1..B, K, 0, hd]      attention_mask [1..B, 1..L]
  1 "decode"   input_ids [1..B, 1]     past [1..B, K, 1..L-1, hd] attention_mask [1..B, 2..L]
  in-place KV cache (past = present = one [B, K, L, hd] buffer):
  0 "prefill"  input_ids [1..B, 1..L]  past [1..B, K, L, hd]      attention_mask [1..B, 1..L]
  1 "decode"   input_ids [1..B, 1]     past [1..B, K, L, hd]      attention_mask [1..B, 1..L]
  num_logits_to_keep (a 0-D int64 shape tensor: its value sizes the logits) takes 0..L (prefill), 0..1
  (decode); TensorRT sizes activation memory for the largest, so a prefill that keeps every position
  (`check`) fits and the runtime's usual keep = 1 needs a fraction of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import LlamaExportError

PLUGIN_LIB = "libllamaexport_plugins.so"
REPO = Path(__file__).resolve().parent.parent
ENGINE_FILE = "engine.plan"
_loaded: dict[str, object] = {}  # plugin library path -> registry handle (loading twice is refused)
_warned = False


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def require_tensorrt(advice: str | None = None, *, what: str = "the engine step"):
    """Import tensorrt or fail with one line saying how to proceed without it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        advice = advice or ("add --export-only to prepare the artifact now and run `llamaexport compile DIR` "
                            "on the target")
        raise LlamaExportError(f"{what} needs TensorRT, which is not installed here (pip install tensorrt on a "
                               f"machine with an NVIDIA GPU); {advice}") from None
    return tensorrt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


# ---------------------------------------------------------------------------------------------- plugins
def find_plugin_library() -> Path | None:
    """$LLAMAEXPORT_PLUGIN_LIB, else build/plugins/ of this checkout, else next to the package."""
    env = os.environ.get("LLAMAEXPORT_PLUGIN_LIB")
    if env == "none":  # build with the ONNX function bodies (scripts/gpu_check.sh's A/B of the plugins)
        return None
    if env:
        if not Path(env).is_file():
            raise LlamaExportError(f"LLAMAEXPORT_PLUGIN_LIB={env} does not exist; build it with "
                                   "`llamaexport plugins build` or unset the variable")
        return Path(env)
    for p in (REPO / "build" / "plugins" / PLUGIN_LIB, Path(__file__).parent / PLUGIN_LIB):
        if p.is_file():
            return p
    return None


def load_plugins(trt, path=None, *, required: bool = False) -> str | None:
    """Register our plugin creators in TensorRT's global registry (once per process; TensorRT
    refuses a second load). Returns the library path, or None (after one warning) without one."""
    global _warned
    from .custom_ops import PLUGIN_NAMESPACE, PLUGIN_VERSION

    reg = trt.get_plugin_registry()
    path = path or find_plugin_library()
    if reg.get_creator("RoPE", PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:  # already loaded (by us or others)
        return str(path) if path else next(iter(_loaded), "registered")
    if path is None:
        if required:
            raise LlamaExportError(f"this engine uses the llamaexport plugins but {PLUGIN_LIB} was not found; build it "
                                   "with `llamaexport plugins build` or set LLAMAEXPORT_PLUGIN_LIB")
        if not _warned:
            log(f"warning: {PLUGIN_LIB} not found (`llamaexport plugins build`, or set LLAMAEXPORT_PLUGIN_LIB); "
                "TensorRT will run the ONNX function bodies of RoPE and SwiGLU instead of the plugins")
            _warned = True
        return None
    handle = reg.load_library(str(path))
    if handle is None:
        raise LlamaExportError(f"TensorRT {trt.__version__} refused the plugin library {path} (built for another "
                               "TensorRT or CUDA?); rebuild it with `llamaexport plugins build`")
    _loaded[str(path)] = handle
    return str(path)


# ---------------------------------------------------------------------------------------------- logging
def make_logger(trt):
    """A TensorRT logger that prints warnings and errors and remembers the last error."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.last_error = None

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 1:
                self.last_error = msg
            if level <= 2:
                log(f"tensorrt: {'error' if level <= 1 else 'warning'}: {msg}")

    return Logger()


def _progress_monitor(trt):
    """Prints the builder's top-level phases and, every 10 s, the step of a long phase."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.lock, self.depth, self.t0, self.last = threading.Lock(), {}, {}, time.monotonic()

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:  # TensorRT calls from several threads
                d = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self.depth[phase_name], self.t0[phase_name] = d, time.monotonic()
                if d <= 1:
                    log(f"tensorrt: {'  ' * d}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            with self.lock:
                now = time.monotonic()
                if now - self.last > 10 and self.depth.get(phase_name, 9) <= 1:
                    self.last = now
                    log(f"tensorrt:   {phase_name}: step {step + 1}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self.lock:
                d = self.depth.pop(phase_name, 9)
                dt = time.monotonic() - self.t0.pop(phase_name, time.monotonic())
                if d == 0:
                    log(f"tensorrt: {phase_name} done in {dt:.1f}s")

    return Monitor()


# ---------------------------------------------------------------------------------------------- build
def timing_cache_path() -> Path:
    if os.environ.get("LLAMAEXPORT_TIMING_CACHE"):
        return Path(os.environ["LLAMAEXPORT_TIMING_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llamaexport" / "timing.cache"


def profile_shapes(manifest: dict, batch: int) -> list[dict]:
    """The prefill and decode profiles: name, (min, max) of batch / seq / past (the cached tokens before
    the new ones), {input: (min, opt, max) shape} for every dynamic input and {shape-tensor input:
    (min, opt, max) values}."""
    from .config import LlamaConfig

    cfg = LlamaConfig.from_dict(manifest["model"])
    L, K, hd = cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim
    past = [n for n in manifest["io"]["inputs"] if n.startswith("past_key_values.")]
    shared = manifest["kv_cache"].get("form") == "past_present_shared"  # one max-length buffer, written in place
    keep = "num_logits_to_keep" in manifest["io"]["inputs"]
    out = []
    # (min, opt, max) of seq and past per profile; attention_mask is [batch, past + seq]. In place, a chunk
    # of a prompt on a cache runs in the prefill profile (the concat form runs it one token at a time).
    if shared:
        ranges = (("prefill", (1, min(L, 256), L), (0, 0, L - 1)), ("decode", (1, 1, 1), (0, max(1, L // 2), L - 1)))
    else:
        ranges = (("prefill", (1, min(L, 256), L), (0, 0, 0)), ("decode", (1, 1, 1), (1, max(1, L // 2), L - 1)))
    for name, seq, pst in ranges:
        bs = (1, batch, batch)
        shapes = {"input_ids": tuple((b, s) for b, s in zip(bs, seq)),
                  "attention_mask": tuple((b, min(s + p, L)) for b, s, p in zip(bs, seq, pst)),
                  "position_ids": tuple((b, s) for b, s in zip(bs, seq))}
        shapes.update({n: tuple((b, K, L if shared else p, hd) for b, p in zip(bs, pst)) for n in past})
        values = {"num_logits_to_keep": ([0], [1], [seq[2]])} if keep else {}
        out.append({"name": name, "batch": [1, batch], "seq": [seq[0], seq[2]], "past": [pst[0], pst[2]],
                    "shapes": shapes, "values": values})
    return out


def require_graph_support(trt, manifest: dict):
    """Refuse, with the way out, a graph whose ops this TensorRT's parser does not map (the manifest's
    graph.min_tensorrt: 10.15 for the in-place KV cache)."""
    from .recipe import version_tuple

    graph = manifest.get("graph") or {}
    need = graph.get("min_tensorrt")
    if need and version_tuple(trt.__version__) < version_tuple(need):
        raise LlamaExportError(f"this artifact's graph ({graph.get('kv_update')} KV cache, {graph.get('attention')} "
                               f"attention) needs TensorRT >= {need}, this is {trt.__version__}; rebuild the artifact "
                               "with --kv-cache concat (every TensorRT 10.x) or upgrade TensorRT")


def build_engine(artifact_dir, manifest: dict, profile, *, progress: bool = True) -> dict:
    """Build `artifact_dir/engine.plan` from its model.onnx; returns the manifest's "engine" entry."""
    trt = require_tensorrt()
    d = Path(artifact_dir)
    if manifest["model"]["max_seq_len"] < 2:
        raise LlamaExportError("the decode profile needs a context of at least 2 tokens; rebuild with --max-seq-len")
    require_graph_support(trt, manifest)
    t0 = time.time()
    mismatch = gpu_mismatch(profile.compute_capability, _gpu_archs())
    if mismatch:
        log(f"warning: profile {profile.name} is for {mismatch}; an engine runs only on the GPU model it was built on")
    logger = make_logger(trt)
    plugin_lib = load_plugins(trt)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if trt_major(trt) >= 11 or flag is None:  # 11.x: always strongly typed; the flag is deprecated and ignored
        network = builder.create_network()
    else:
        network = builder.create_network(1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):  # 10.15+; our nodes' plugin_namespace suffices too
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    onnx_path = d / manifest["files"]["onnx"]
    log(f"tensorrt {trt.__version__}: parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):  # external data is read from next to the file
        if parser.num_errors == 0:
            raise LlamaExportError(f"TensorRT cannot parse {onnx_path} ({logger.last_error}); rebuild the artifact")
        e = parser.get_error(0)
        more = f" (and {parser.num_errors - 1} more)" if parser.num_errors > 1 else ""
        raise LlamaExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {e.desc()} at node {e.node()} "
                               f"{e.node_name()!r} ({e.node_operator()}){more}; upgrade TensorRT (>= 10.0) "
                               "or export another --precision")
    n_plugins = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    if plugin_lib and not n_plugins:
        log(f"note: TensorRT {trt.__version__} expanded the RoPE/SwiGLU function bodies (the plugins need >= 10.7)")

    config = builder.create_builder_config()
    opts = profile.builder or {}
    workspace_gb = profile.workspace_gb  # what the planner counted
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if opts.get("builder_optimization_level") is not None:
        config.builder_optimization_level = int(opts["builder_optimization_level"])
    batch = int(profile.default_batch)
    profiles = []
    for prof_def in profile_shapes(manifest, batch):
        p = builder.create_optimization_profile()
        for inp, (lo, opt, hi) in prof_def.pop("shapes").items():
            p.set_shape(inp, lo, opt, hi)  # raises RuntimeError on an inconsistent shape
        for inp, (lo, opt, hi) in prof_def.pop("values").items():  # shape-tensor inputs (NvInferRuntime.h:
            p.set_shape_input(inp, lo, opt, hi)                   # IOptimizationProfile::setShapeValues[V2])
        index = config.add_optimization_profile(p)
        if index < 0:
            raise LlamaExportError(f"TensorRT rejected the {prof_def['name']} optimization profile "
                                   f"({logger.last_error}); rebuild the artifact")
        profiles.append({**prof_def, "index": index})
    cache_path = timing_cache_path()
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, False):
        log(f"warning: timing cache {cache_path} is from another GPU or TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    monitor = _progress_monitor(trt) if progress and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor
    log(f"tensorrt: building ({workspace_gb:g} GiB workspace, optimization level {config.builder_optimization_level}, "
        f"{n_plugins} plugin layers, batch <= {batch}, context {manifest['model']['max_seq_len']})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LlamaExportError(
            f"TensorRT could not build the engine ({logger.last_error or 'see its messages above'}); if it ran out "
            f"of memory, lower [builder] workspace_gb (now {workspace_gb:g}) in the profile, close other GPU "
            "programs, or rebuild with a smaller --precision or --max-seq-len")
    tmp = d / f".{ENGINE_FILE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(plan))
        os.replace(tmp, d / ENGINE_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    _save_timing_cache(config.get_timing_cache() or cache, cache_path)
    seconds = round(time.time() - t0, 1)
    log(f"tensorrt: wrote {ENGINE_FILE} ({(d / ENGINE_FILE).stat().st_size / 2**20:.1f} MiB) in {seconds}s")
    return {"file": ENGINE_FILE, "tensorrt": trt.__version__, "profiles": profiles, "timing_cache": str(cache_path),
            "build_seconds": seconds, "plugin_library": plugin_lib, "plugin_layers": n_plugins,
            "workspace_gb": workspace_gb, "builder_optimization_level": config.builder_optimization_level}


def _save_timing_cache(cache, path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(memoryview(cache.serialize()))
        os.replace(tmp, path)
    except OSError as e:  # a cache is an optimisation: never fail a build over it
        log(f"warning: could not save the timing cache {path}: {e}")


def compile_artifact(artifact_dir, *, profile: str | None = None, force: bool = False) -> dict:
    """Build the engine of an --export-only TensorRT artifact in place; returns its engine entry."""
    from .manifest import read_manifest, write_manifest
    from .profiles import load_profile

    d = Path(artifact_dir)
    m = read_manifest(d)
    if m.get("backend") != "tensorrt":
        raise LlamaExportError(f"{d} is an {m.get('backend')} artifact, there is no engine to compile; "
                               "build it with a TensorRT --profile")
    if m.get("engine") and not force:
        raise LlamaExportError(f"{d} already has an engine ({m['engine']['file']}); pass --force to rebuild it")
    prof = load_profile(profile or m["profile"])
    if prof.backend != "tensorrt":
        raise LlamaExportError(f"profile {prof.name} is for {prof.backend}; choose a TensorRT profile")
    if m["precision"] not in prof.precisions:
        raise LlamaExportError(f"the artifact is {m['precision']}, which profile {prof.name} does not support "
                               f"({', '.join(prof.precisions)}); rebuild the artifact for this profile")
    trt = require_tensorrt(f"run it there, on the GPU the engine is for ({d} stays as it is)",
                           what="`llamaexport compile`")
    from .manifest import file_checksums, require_intact
    from .staging import target_lock

    with target_lock(d.absolute()):  # no build or other compile writes this artifact meanwhile
        require_intact(d, m)  # new checksums must not bless a damaged model.onnx
        m["engine"] = build_engine(d, m, prof, progress=True)
        if "checksums" in m:
            m["checksums"] = file_checksums(d)
        m["profile"], m["parity"] = prof.name, None  # an earlier check ran another backend
        m.setdefault("tool_versions", {})["tensorrt"] = trt.__version__
        write_manifest(d, m)
    return m["engine"]


# ---------------------------------------------------------------------------------------------- plugins build
def gpu_mismatch(compute_capability: str | None, archs: str | None) -> str | None:
    """A description of how the profile's GPU (compute capability "8.9") differs from this machine's
    (archs as _gpu_archs gives them, "89" or "80;90"), or None when they agree or either is unknown."""
    if not compute_capability or not archs:
        return None
    want = compute_capability.replace(".", "")
    have = archs.split(";")
    if want in have:
        return None
    return (f"compute capability {compute_capability}, this machine's GPU has "
            f"{', '.join(a[:-1] + '.' + a[-1] for a in have)}")


def _gpu_archs() -> str | None:
    """This machine's GPU architectures ("89", "80;90"), from nvidia-smi; None if unknown."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    r = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
    caps = sorted({c.strip().replace(".", "") for c in r.stdout.split()} if r.returncode == 0 else set())
    return ";".join(caps) if caps and all(c.isdigit() for c in caps) else None


def build_plugins(*, tensorrt_root=None, cuda_arch=None, kernels_only=False) -> Path:
    """cmake configure + build plugins/ into build/plugins; returns the library (or the build dir)."""
    src, out = REPO / "plugins", REPO / "build" / "plugins"
    if not (src / "CMakeLists.txt").is_file():
        raise LlamaExportError(f"the plugin sources are not here ({src}): llamaexport was installed without them; "
                               "clone the repository and run `llamaexport plugins build` there")
    cmake = shutil.which("cmake")
    if not cmake:
        raise LlamaExportError("cmake not found; install CMake >= 3.18 (e.g. pip install cmake)")
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)
    if not nvcc:
        raise LlamaExportError("nvcc not found; install the CUDA toolkit (>= 11.8) or set CUDACXX=/path/to/nvcc")
    args = [cmake, "-S", str(src), "-B", str(out), f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DLLAMAEXPORT_KERNELS_ONLY={'ON' if kernels_only else 'OFF'}"]
    if not kernels_only:
        root = tensorrt_root or os.environ.get("TensorRT_ROOT") or os.environ.get("TRT_ROOT")
        if root:
            if not (Path(root) / "include" / "NvInferRuntime.h").is_file():
                raise LlamaExportError(f"no include/NvInferRuntime.h under {root}; pass the TensorRT install prefix")
            args.append(f"-DTensorRT_ROOT={root}")
        elif not any(Path(p).is_file() for p in ("/usr/include/x86_64-linux-gnu/NvInferRuntime.h",
                                                  "/usr/include/aarch64-linux-gnu/NvInferRuntime.h",
                                                  "/usr/include/NvInferRuntime.h")):
            raise LlamaExportError("TensorRT headers not found (the pip wheels ship none): pass --tensorrt-root with "
                                   "a TensorRT tar/zip install, install libnvinfer-dev, or use --kernels-only")
    arch = (cuda_arch or "").replace(",", ";") or _gpu_archs()
    if arch:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    for cmd in (args, [cmake, "--build", str(out), "-j", str(os.cpu_count() or 2)]):
        log("$ " + " ".join(cmd))
        r = subprocess.run(cmd)  # output streams to the terminal
        if r.returncode != 0:
            raise LlamaExportError(f"{' '.join(cmd[:2])} failed (exit {r.returncode}); see the cmake output above")
    lib = out / PLUGIN_LIB
    return out if kernels_only else lib
