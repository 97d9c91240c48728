"""TensorRT engine building: model.onnx -> engine.plan with a prefill and a decode profile.

TensorRT is imported lazily (only NVIDIA machines have it). The network is strongly typed:
precision lives in the ONNX graph (fp16 casts, DequantizeLinear), so there are no FP16/INT8
builder flags (TensorRT 11 removed them). TF32 is another matter: BuilderFlag.kTF32 is "enabled
by default" and lets fp32 matmuls round their inputs to 10-bit mantissas (include/NvInfer.h,
NVIDIA/TensorRT release/10.3, 10.16 and 11.0 alike), so fp32 artifacts clear it. Our RoPE/SwiGLU
nodes become IPluginV3 layers when libllamaexport_plugins.so is loaded (TensorRT >= 10.7), else
their ONNX function bodies; the library must be built against the running TensorRT's major
version (check_plugin_library).

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

import ctypes
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import LlamaExportError
from .manifest import write_atomically

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


def load_plugins(trt, path=None, *, required: bool = False, logger=None) -> str | None:
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
    check_plugin_library(path, trt.__version__)  # before TensorRT calls into it through its vtables
    handle = reg.load_library(str(path))
    if handle is None:
        raise LlamaExportError(f"TensorRT {trt.__version__} refused the plugin library {path}"
                               f"{_said(logger and logger.last_error)}; rebuild it with `llamaexport plugins build`")
    _loaded[str(path)] = handle
    return str(path)


def plugin_library_trt_version(path) -> tuple[int, int] | None:
    """(major, minor) of the TensorRT headers the plugin library at `path` was compiled against, read
    with ctypes from its exported llamaexport_plugins_trt_major/_minor (plugins/plugin_api.cpp); None
    for a library that does not export them (built before they existed)."""
    try:
        lib = ctypes.CDLL(str(path))  # the library links no libnvinfer: it loads without TensorRT
    except OSError as e:
        raise LlamaExportError(f"cannot load the plugin library {path} ({e}); rebuild it with "
                               "`llamaexport plugins build`") from None
    try:
        major, minor = lib.llamaexport_plugins_trt_major, lib.llamaexport_plugins_trt_minor
    except AttributeError:
        return None
    major.restype = minor.restype = ctypes.c_int32
    major.argtypes = minor.argtypes = []
    return int(major()), int(minor())


def check_plugin_library(path, trt_version: str) -> tuple[int, int]:
    """Refuse (one line naming both versions) a plugin library built against another TensorRT major
    than `trt_version`, the running one: the logger interfaces changed in 11.0 (see plugin_api.cpp),
    so such a library would call TensorRT's logger through the wrong vtable slot. Returns the
    library's (major, minor)."""
    built = plugin_library_trt_version(path)
    if built is None:
        raise LlamaExportError(f"the plugin library {path} does not say which TensorRT it was built for (an older "
                               f"build); rebuild it for this TensorRT {trt_version} with `llamaexport plugins build`")
    running = int(str(trt_version).split(".")[0])
    if built[0] != running:
        raise LlamaExportError(f"the plugin library {path} was built against TensorRT {built[0]}.{built[1]} headers "
                               f"but this is TensorRT {trt_version}: a plugin library loads only into the TensorRT "
                               f"major it was built for; rebuild it with `llamaexport plugins build` and the "
                               f"TensorRT {running}.x headers")
    return built


# ---------------------------------------------------------------------------------------------- logging
def make_logger(trt):
    """A TensorRT logger that prints warnings and errors and remembers the last of each."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.last_error = self.last_warning = None

        def log(self, severity, msg):
            level = int(severity)  # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, VERBOSE 4
            if level <= 1:
                self.last_error = msg
            elif level == 2:
                self.last_warning = msg
            if level <= 2:
                log(f"tensorrt: {'error' if level <= 1 else 'warning'}: {msg}")

    return Logger()


def _one_line(text) -> str:
    """TensorRT's messages may span lines (the parser's "Invalid Node - ..." details); an error is one."""
    return " ".join(str(text).split())


def _said(msg) -> str:
    """' (TensorRT said: ...)' for a message TensorRT logged, '' for none."""
    return f" (TensorRT said: {_one_line(msg)})" if msg else ""


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


class Stage:
    """What the build or runtime is doing now, for the one error line when a TensorRT call raises
    (the Python bindings raise RuntimeError/TypeError where the C++ API returns null or false)."""

    def __init__(self, trt, logger):
        self.trt, self.logger, self.now = trt, logger, "starting"

    def error(self, e: Exception, advice: str) -> LlamaExportError:
        return LlamaExportError(f"TensorRT {self.trt.__version__} failed while {self.now}: {type(e).__name__}: "
                                f"{_one_line(e) or 'no message'}{_said(self.logger.last_error)}; {advice}")


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
    mismatch = gpu_mismatch(profile.compute_capability, _gpu_archs())
    if mismatch:
        log(f"warning: profile {profile.name} is for {mismatch}; an engine runs only on the GPU model it was built on")
    logger = make_logger(trt)
    stage = Stage(trt, logger)
    try:
        return _build_engine(trt, logger, stage, d, manifest, profile, progress=progress)
    except LlamaExportError:
        raise
    except Exception as e:  # a binding raised: say which step, with TensorRT's own message
        raise stage.error(e, "nothing was written; the step and TensorRT's message above say what to change") from None


def _build_engine(trt, logger, stage: Stage, d: Path, manifest: dict, profile, *, progress: bool) -> dict:
    t0 = time.time()
    stage.now = "loading the plugin library"
    plugin_lib = load_plugins(trt, logger=logger)
    stage.now = "creating the builder"
    builder = trt.Builder(logger)
    if builder is None:
        raise LlamaExportError(f"TensorRT {trt.__version__} could not create a builder{_said(logger.last_error)}; "
                               "check that the GPU and its driver work (nvidia-smi)")
    stage.now = "creating the network"
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if trt_major(trt) >= 11 or flag is None:  # 11.x: always strongly typed; the flag is deprecated and ignored
        network = builder.create_network()
    else:
        network = builder.create_network(1 << int(flag))
    # No OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE (10.15+): it makes the parser try the plugin registry
    # for every node's op type, so a process that also registered NVIDIA's standard plugins would
    # import our QKV `Split` as the deprecated `Split` plugin (plugin/splitPlugin, still in 10.16).
    # Our RoPE/SwiGLU nodes carry a plugin_namespace attribute, which alone sends them to the
    # plugin first (onnx-tensorrt ModelImporter.cpp parseNode: `if (pluginOverriding ||
    # isPluginNode)` with isPluginNode = attrs.count("plugin_namespace"); isNodeInPluginRegistry
    # looks the creator up by (op_type, plugin_version, plugin_namespace)).
    stage.now = "creating the ONNX parser"
    parser = trt.OnnxParser(network, logger)
    onnx_path = d / manifest["files"]["onnx"]
    stage.now = f"parsing {onnx_path.name}"
    log(f"tensorrt {trt.__version__}: parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):  # external data is read from next to the file
        raise LlamaExportError(parse_failure(trt.__version__, onnx_path, _parser_errors(parser), logger.last_error))
    n_plugins = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    if plugin_lib and not n_plugins:
        log(no_plugin_layers(trt.__version__, plugin_lib, _registered_creators(trt), logger.last_warning))

    stage.now = "configuring the builder"
    config = builder.create_builder_config()
    opts = profile.builder or {}
    workspace_gb = profile.workspace_gb  # what the planner counted
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if opts.get("builder_optimization_level") is not None:
        config.builder_optimization_level = int(opts["builder_optimization_level"])
    tf32 = _tf32_allowed(trt, config, manifest["precision"])
    batch = int(profile.default_batch)
    profiles = []
    for prof_def in profile_shapes(manifest, batch):
        p = builder.create_optimization_profile()
        for inp, (lo, opt, hi) in prof_def.pop("shapes").items():
            stage.now = f"setting the {prof_def['name']} profile's shapes of {inp} (min {lo}, opt {opt}, max {hi})"
            p.set_shape(inp, lo, opt, hi)  # raises RuntimeError on an inconsistent shape
        for inp, (lo, opt, hi) in prof_def.pop("values").items():  # shape-tensor inputs (NvInferRuntime.h:
            stage.now = f"setting the {prof_def['name']} profile's values of {inp} (min {lo}, opt {opt}, max {hi})"
            p.set_shape_input(inp, lo, opt, hi)                   # IOptimizationProfile::setShapeValues[V2])
        stage.now = f"adding the {prof_def['name']} optimization profile"
        index = config.add_optimization_profile(p)
        if index < 0:
            raise LlamaExportError(f"TensorRT {trt.__version__} rejected the {prof_def['name']} optimization profile"
                                   f"{_said(logger.last_error)}; rebuild the artifact")
        profiles.append({**prof_def, "index": index})
    stage.now = "setting up the timing cache"
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
        f"{n_plugins} plugin layers, batch <= {batch}, context {manifest['model']['max_seq_len']}, "
        f"TF32 {'allowed' if tf32 else 'off'})")
    stage.now = "building the engine"
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LlamaExportError(
            f"TensorRT {trt.__version__} could not build the engine ({logger.last_error or 'see its messages above'}); "
            f"if it ran out of memory, lower [builder] workspace_gb (now {workspace_gb:g}) in the profile, close other "
            "GPU programs, or rebuild with a smaller --precision or --max-seq-len")
    stage.now = f"writing {ENGINE_FILE}"
    write_atomically(d / ENGINE_FILE, lambda f: f.write(memoryview(plan)))
    _save_timing_cache(config.get_timing_cache() or cache, cache_path)
    seconds = round(time.time() - t0, 1)
    log(f"tensorrt: wrote {ENGINE_FILE} ({(d / ENGINE_FILE).stat().st_size / 2**20:.1f} MiB) in {seconds}s")
    return {"file": ENGINE_FILE, "tensorrt": trt.__version__, "profiles": profiles, "timing_cache": str(cache_path),
            "build_seconds": seconds, "plugin_library": plugin_lib, "plugin_layers": n_plugins, "tf32": tf32,
            "workspace_gb": workspace_gb, "builder_optimization_level": config.builder_optimization_level}


def _tf32_allowed(trt, config, precision: str) -> bool:
    """Clear BuilderFlag.TF32 (on by default in 10.x and 11.x) for fp32 artifacts, whose parity budget
    is fp32's; fp16/quantized graphs keep it for their few fp32 ops. Returns whether TF32 stays on."""
    flag = getattr(trt.BuilderFlag, "TF32", None)
    if flag is None:  # a TensorRT without the flag has no TF32 to turn off
        return False
    if precision == "fp32":
        config.clear_flag(flag)
    return bool(config.get_flag(flag))


def _parser_errors(parser) -> list[str]:
    """The ONNX parser's errors, each as 'desc at node N 'name' (op)'."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        where = f" at node {e.node()} {e.node_name()!r} ({e.node_operator()})" if e.node() >= 0 else ""
        out.append(f"{_one_line(e.desc())}{where}")
    return out


def parse_failure(version: str, onnx_path, errors: list[str], last_error: str | None) -> str:
    """The one error line for a model TensorRT `version` cannot parse: the parser's own errors (the
    first two, and how many more), else TensorRT's last logged error."""
    if not errors:
        return (f"TensorRT {version} cannot parse {onnx_path}{_said(last_error)}; check that model.onnx and "
                "model.onnx.data are intact (`llamaexport check`), or rebuild the artifact")
    more = f" (and {len(errors) - 2} more)" if len(errors) > 2 else ""
    return (f"TensorRT {version} cannot parse {onnx_path}: {' | '.join(errors[:2])}{more}; the first is where "
            "the parser stopped (`llamaexport check DIR --backend onnxruntime` still checks the graph on the CPU)")


def _registered_creators(trt) -> dict[str, bool]:
    from .custom_ops import PLUGIN_NAMESPACE, PLUGIN_VERSION

    reg = trt.get_plugin_registry()
    return {n: reg.get_creator(n, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None for n in ("RoPE", "SwiGLU")}


def no_plugin_layers(version: str, plugin_lib: str, creators: dict[str, bool], last_warning: str | None) -> str:
    """The message when the plugin library is loaded but the parsed network has no plugin layer.
    Before 10.7 that is how the parser works (it prefers a node's local function to a plugin:
    CHANGELOG 10.7, "prioritizes using plugins over local functions"); from 10.7 on it is not, and
    the message says what was found instead of guessing at the version."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) < (10, 7):
        return (f"note: TensorRT {version} expands the RoPE/SwiGLU function bodies instead of the plugins (its ONNX "
                "parser prefers a node's local function to a plugin before 10.7)")
    missing = [n for n, ok in creators.items() if not ok]
    found = (f"the creator{'s' if len(missing) > 1 else ''} {' and '.join(missing)} (namespace llamaexport, "
             f"version 1) {'are' if len(missing) > 1 else 'is'} not registered" if missing
             else "its RoPE and SwiGLU creators are registered")
    said = f"; last TensorRT warning: {_one_line(last_warning)}" if last_warning else ""
    return (f"warning: TensorRT {version} made no plugin layers although {plugin_lib} is loaded: {found}{said}; "
            "the engine runs the RoPE/SwiGLU function bodies instead")


def _save_timing_cache(cache, path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(memoryview(cache.serialize())))
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


SYSTEM_TRT_INCLUDE_DIRS = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include")


def tensorrt_header_version(include_dir) -> tuple[int, int, int]:
    """(major, minor, patch) of the TensorRT headers in `include_dir`, from its NvInferVersion.h.
    10.0-10.14 define the numbers (`#define NV_TENSORRT_MAJOR 10`); 10.15, 10.16 and 11.x define
    them through another macro (`#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE` after
    `#define TRT_MAJOR_ENTERPRISE 11`: include/NvInferVersion.h, NVIDIA/TensorRT release/10.16, 11.1)."""
    f = Path(include_dir) / "NvInferVersion.h"
    try:
        text = f.read_text(errors="replace")
    except OSError as e:
        raise LlamaExportError(f"cannot read {f} ({e.strerror}): these are not complete TensorRT headers; pass "
                               "--tensorrt-root with a TensorRT install") from None
    defines = dict(re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\w+)", text, re.MULTILINE))

    def value(name: str, hops: int = 0) -> int | None:
        v = defines.get(name)
        if v is None or hops > 4:
            return None
        return int(v) if v.isdigit() else value(v, hops + 1)

    parts = [value(f"NV_TENSORRT_{p}") for p in ("MAJOR", "MINOR", "PATCH")]
    if None in parts:
        raise LlamaExportError(f"{f} does not define NV_TENSORRT_MAJOR, _MINOR and _PATCH as numbers; pass "
                               "--tensorrt-root with a TensorRT install")
    return parts[0], parts[1], parts[2]


def find_tensorrt_headers(tensorrt_root=None) -> list[tuple[Path, tuple[int, int, int]]]:
    """Every TensorRT include directory to consider, with its version: `tensorrt_root`'s only when
    given, else $TensorRT_ROOT / $TRT_ROOT's, then the Debian/JetPack locations."""
    if tensorrt_root:
        root = Path(tensorrt_root)
        dirs = [d for d in (root / "include", root) if (d / "NvInferRuntime.h").is_file()]
        if not dirs:
            raise LlamaExportError(f"no include/NvInferRuntime.h under {root}; pass the TensorRT install prefix")
        return [(dirs[0], tensorrt_header_version(dirs[0]))]
    roots = [os.environ.get("TensorRT_ROOT"), os.environ.get("TRT_ROOT")]
    cands = [Path(r) / "include" for r in roots if r] + [Path(p) for p in SYSTEM_TRT_INCLUDE_DIRS]
    return [(c, tensorrt_header_version(c)) for c in dict.fromkeys(cands) if (c / "NvInferRuntime.h").is_file()]


def _installed_tensorrt() -> str | None:
    """The version of the tensorrt Python package here, or None without one."""
    try:
        import tensorrt
    except ImportError:
        return None
    except Exception as e:  # installed but broken (its libnvinfer missing, ...): the headers cannot be matched
        log(f"warning: the tensorrt package is installed but does not import ({type(e).__name__}: {_one_line(e)})")
        return None
    return tensorrt.__version__


def select_tensorrt_headers(found: list[tuple[Path, tuple[int, int, int]]],
                            installed: str | None) -> tuple[Path, tuple[int, int, int]]:
    """The headers to build the plugin library with: the first of `found` whose major version is the
    installed tensorrt package's (a library loads only into that major: check_plugin_library), or
    the first when no package is installed. Says which it took; refuses a mismatch with one line."""
    if not found:
        raise LlamaExportError("TensorRT headers not found (the pip wheels ship none): pass --tensorrt-root with "
                               "a TensorRT tar/zip install, install libnvinfer-dev, or use --kernels-only")

    def name(v):
        return ".".join(map(str, v))

    if installed is None:
        include, version = found[0]
        log(f"TensorRT headers: {include} (TensorRT {name(version)}); no tensorrt Python package here, so the "
            f"library will load only into TensorRT {version[0]}.x")
        return include, version
    major = int(installed.split(".")[0])
    for include, version in found:
        if version[0] == major:
            log(f"TensorRT headers: {include} (TensorRT {name(version)}), for the installed tensorrt {installed}")
            return include, version
    seen = ", ".join(f"{name(v)} in {d}" for d, v in found)
    raise LlamaExportError(f"the TensorRT headers found ({seen}) do not match the installed tensorrt {installed}: "
                           f"a plugin library loads only into the TensorRT major it was built for; pass "
                           f"--tensorrt-root with TensorRT {major}.x headers (its tar/zip install, or libnvinfer-dev)")


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
        include, version = select_tensorrt_headers(find_tensorrt_headers(tensorrt_root), _installed_tensorrt())
        # explicit, so a build dir configured earlier with other headers (CMake caches find_path) follows
        args.append(f"-DTensorRT_INCLUDE_DIR={include}")
    arch = (cuda_arch or "").replace(",", ";") or _gpu_archs()
    if arch:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    for cmd in (args, [cmake, "--build", str(out), "-j", str(os.cpu_count() or 2)]):
        log("$ " + " ".join(cmd))
        r = subprocess.run(cmd)  # output streams to the terminal
        if r.returncode != 0:
            raise LlamaExportError(f"{' '.join(cmd[:2])} failed (exit {r.returncode}); see the cmake output above")
    if kernels_only:
        return out
    lib = out / PLUGIN_LIB
    built = plugin_library_trt_version(lib)
    if built != version[:2]:  # the compile must have used the headers chosen above
        raise LlamaExportError(f"{lib} records TensorRT {built} but was configured with the {version} headers in "
                               f"{include}; delete {out} and run `llamaexport plugins build` again")
    return lib
