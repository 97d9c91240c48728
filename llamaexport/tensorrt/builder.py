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

import os
import threading
import time
from pathlib import Path

from llamaexport import LlamaExportError
from llamaexport.artifact.manifest import write_atomically
from llamaexport.tensorrt.api import Stage, log, make_logger, one_line, require_tensorrt, said, trt_major, version_tuple
from llamaexport.tensorrt.plugins import gpu_archs, load_plugins, registered_creators

ENGINE_FILE = "engine.plan"


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
    from llamaexport.model.config import LlamaConfig
    from llamaexport.model.kv_form import KVForm

    cfg = LlamaConfig.from_dict(manifest["model"])
    L, K, hd = cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim
    past = [n for n in manifest["io"]["inputs"] if n.startswith("past_key_values.")]
    in_place = KVForm.of(manifest) is KVForm.INPLACE  # one max-length buffer, written in place
    keep = "num_logits_to_keep" in manifest["io"]["inputs"]
    out = []
    # (min, opt, max) of seq and past per profile; attention_mask is [batch, past + seq]. In place, a chunk
    # of a prompt on a cache runs in the prefill profile (the concat form runs it one token at a time).
    if in_place:
        ranges = (("prefill", (1, min(L, 256), L), (0, 0, L - 1)), ("decode", (1, 1, 1), (0, max(1, L // 2), L - 1)))
    else:
        ranges = (("prefill", (1, min(L, 256), L), (0, 0, 0)), ("decode", (1, 1, 1), (1, max(1, L // 2), L - 1)))
    for name, seq, pst in ranges:
        bs = (1, batch, batch)
        shapes = {"input_ids": tuple((b, s) for b, s in zip(bs, seq)),
                  "attention_mask": tuple((b, min(s + p, L)) for b, s, p in zip(bs, seq, pst)),
                  "position_ids": tuple((b, s) for b, s in zip(bs, seq))}
        shapes.update({n: tuple((b, K, L if in_place else p, hd) for b, p in zip(bs, pst)) for n in past})
        values = {"num_logits_to_keep": ([0], [1], [seq[2]])} if keep else {}
        out.append({"name": name, "batch": [1, batch], "seq": [seq[0], seq[2]], "past": [pst[0], pst[2]],
                    "shapes": shapes, "values": values})
    return out



def require_graph_support(trt, manifest: dict):
    """Refuse, with the way out, a graph whose ops this TensorRT's parser does not map (the manifest's
    graph.min_tensorrt: 10.15 for the in-place KV cache)."""
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
    mismatch = gpu_mismatch(profile.compute_capability, gpu_archs())
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
    """The build's steps, in TensorRT's order: parse the graph, configure the builder (workspace, TF32, the
    optimization profiles, the timing cache), build, write engine.plan. `stage.now` names each step."""
    t0 = time.time()
    # the parser owns the weights the network refers to: it stays alive until the engine is built
    plugin_lib, builder, network, parser, n_plugins = _parse_network(trt, logger, stage, d, manifest)
    config, tf32 = _configure_builder(trt, stage, builder, manifest, profile)
    batch = int(profile.default_batch)
    profiles = _add_profiles(trt, logger, stage, builder, config, manifest, batch)
    cache, cache_path = _use_timing_cache(stage, config)
    monitor = _progress_monitor(trt) if progress and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor
    workspace_gb = profile.workspace_gb
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


def _parse_network(trt, logger, stage: Stage, d: Path, manifest: dict):
    """Load the plugin library, create the builder and a strongly typed network, and parse model.onnx into it.
    Returns (plugin library or None, builder, network, parser, number of plugin layers)."""
    stage.now = "loading the plugin library"
    plugin_lib = load_plugins(trt, logger=logger)
    stage.now = "creating the builder"
    builder = trt.Builder(logger)
    if builder is None:
        raise LlamaExportError(f"TensorRT {trt.__version__} could not create a builder{said(logger.last_error)}; "
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
        log(no_plugin_layers(trt.__version__, plugin_lib, registered_creators(trt), logger.last_warning))
    return plugin_lib, builder, network, parser, n_plugins


def _configure_builder(trt, stage: Stage, builder, manifest: dict, profile):
    """The builder config: the workspace the planner counted, the profile's optimization level, TF32 per the
    precision. Returns (config, whether TF32 stays on)."""
    stage.now = "configuring the builder"
    config = builder.create_builder_config()
    opts = profile.builder or {}
    workspace_gb = profile.workspace_gb  # what the planner counted
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if opts.get("builder_optimization_level") is not None:
        config.builder_optimization_level = int(opts["builder_optimization_level"])
    return config, _tf32_allowed(trt, config, manifest["precision"])


def _add_profiles(trt, logger, stage: Stage, builder, config, manifest: dict, batch: int) -> list[dict]:
    """Add the prefill and decode optimization profiles (profile_shapes) to `config`; returns the manifest's
    profile entries, each with its index."""
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
                                   f"{said(logger.last_error)}; rebuild the artifact")
        profiles.append({**prof_def, "index": index})
    return profiles


def _use_timing_cache(stage: Stage, config):
    """Load the timing cache into `config` (a new one when it is from another GPU or TensorRT); returns
    (the cache, its path)."""
    stage.now = "setting up the timing cache"
    cache_path = timing_cache_path()
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, False):
        log(f"warning: timing cache {cache_path} is from another GPU or TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache, cache_path


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
        out.append(f"{one_line(e.desc())}{where}")
    return out


def parse_failure(version: str, onnx_path, errors: list[str], last_error: str | None) -> str:
    """The one error line for a model TensorRT `version` cannot parse: the parser's own errors (the
    first two, and how many more), else TensorRT's last logged error."""
    if not errors:
        return (f"TensorRT {version} cannot parse {onnx_path}{said(last_error)}; check that model.onnx and "
                "model.onnx.data are intact (`llamaexport check`), or rebuild the artifact")
    more = f" (and {len(errors) - 2} more)" if len(errors) > 2 else ""
    return (f"TensorRT {version} cannot parse {onnx_path}: {' | '.join(errors[:2])}{more}; the first is where "
            "the parser stopped (`llamaexport check DIR --backend onnxruntime` still checks the graph on the CPU)")



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
    said = f"; last TensorRT warning: {one_line(last_warning)}" if last_warning else ""
    return (f"warning: TensorRT {version} made no plugin layers although {plugin_lib} is loaded: {found}{said}; "
            "the engine runs the RoPE/SwiGLU function bodies instead")


def _save_timing_cache(cache, path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(memoryview(cache.serialize())))
    except OSError as e:  # a cache is an optimisation: never fail a build over it
        log(f"warning: could not save the timing cache {path}: {e}")


def gpu_mismatch(compute_capability: str | None, archs: str | None) -> str | None:
    """A description of how the profile's GPU (compute capability "8.9") differs from this machine's
    (archs as gpu_archs gives them, "89" or "80;90"), or None when they agree or either is unknown."""
    if not compute_capability or not archs:
        return None
    want = compute_capability.replace(".", "")
    have = archs.split(";")
    if want in have:
        return None
    return (f"compute capability {compute_capability}, this machine's GPU has "
            f"{', '.join(a[:-1] + '.' + a[-1] for a in have)}")
