"""`llamaexport check DIR --layerwise`: where an artifact leaves the reference, layer by layer.

One teacher-forced prefill of the start of check's held-out text runs through the artifact's ONNX graph with
intermediate tensors marked as outputs (Polygraphy: ModifyOutputs, run by OnnxrtRunner; with
TensorRT, ModifyNetworkOutputs on a debug engine run by TrtRunner), and through the float32
PyTorch reference with the same tensors captured (model.intermediates). Per decoder layer:

  attention  the attention output before o_proj [B, S, H*hd]
  o_proj     ... after o_proj [B, S, D]
  mlp        the MLP output (down_proj) [B, S, D]
  residual   the residual stream after the layer [B, S, D]

plus the embedding rows before the first layer and the logits after the last. The graph's tensors
are found by the node names export.py gives (/model/layers.{i}/attn/o_proj/..., the norms that add
each layer's output to the residual stream), whatever form the linears take (MatMul, Q/DQ,
MatMulNBits) and whichever attention (GroupQueryAttention, or the portable one).

Metric: the RMS relative error ||art - ref|| / ||ref|| of each tensor. Budgets, from the precision's
max_mean_kl (data/parity_thresholds.json):
  stream tensors (embedding, residual, logits)   sqrt(2 * max_mean_kl)
  op outputs (attention, o_proj, mlp)             twice that
For small logit errors d, KL(p || q) ~ Var_p(d) / 2, so a relative error r carried to logits of unit
spread costs a KL of about r^2 / 2: the precision's KL budget allows r up to sqrt(2 * max_mean_kl)
(fp32 1.4e-3, fp16 0.045, int8 0.1, w8a8 0.2, int4 0.32). An op's output is one part of the stream
it is added to, so its own relative error may be larger for the same effect; twice the stream's
budget leaves a healthy build's quantization error inside it (docs/accuracy.md has the figures) while
a divergence (wrong weights, a kernel bug, an overflow) puts a tensor near 1 or beyond. The first
tensor over its budget, in graph order, is named; a miss exits 2 as `check` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError, log
from llamaexport.artifact.manifest import read_manifest, require_intact
from llamaexport.model.kv_form import KVForm

STREAM = ("embedding", "residual", "logits")       # the residual stream and what it becomes; the rest are op outputs
OP_FACTOR = 2.0                                    # an op output's budget: this times the stream's
HELDOUT_TOKENS = 128                                # how much of check's held-out text one prefill runs
QUIET = 51  # above Polygraphy's CRITICAL (50): it logs nothing; its errors still raise, with their message


@dataclass(frozen=True)
class Tap:
    """A tensor of the artifact's graph and the reference value it is compared with."""
    layer: int | None  # None: before the first layer (embedding) or after the last (logits)
    op: str
    tensor: str        # the ONNX tensor name (TensorRT keeps it for the network's tensors)
    ref: str           # the key of model.intermediates


def budgets(precision: str) -> dict:
    """The RMS relative error budgets of a precision's tensors (module docstring):
    {"stream": sqrt(2 * max_mean_kl), "op": OP_FACTOR times that}."""
    from llamaexport.verify.parity import thresholds

    kl = thresholds(precision).get("max_mean_kl")
    if kl is None:
        raise LlamaExportError(f"precision {precision!r} has no max_mean_kl in parity_thresholds.json to derive "
                               "the layerwise budget from")
    stream = math.sqrt(2.0 * kl)
    return {"stream": stream, "op": OP_FACTOR * stream}


# ---------------------------------------------------------------------------------------------- the graph's tensors
def graph_taps(model, n_layers: int) -> list[Tap]:
    """The tensors to compare in an artifact's ONNX graph (a ModelProto; weights need not be loaded),
    in graph order. Raises when the graph lacks one (a graph from another exporter)."""
    from llamaexport.build.recipe import ROLES

    g = model.graph
    consts = {t.name for t in g.initializer} | {i.name for i in g.input}
    by_name = {n.name: n for n in g.node}
    consumers: dict[str, list[str]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n.name)
    graph_out = {o.name for o in g.output}

    def missing(what: str):
        return LlamaExportError(f"the graph has no {what} (node names as llamaexport exports them); layerwise "
                                "comparison needs an artifact built by llamaexport: rebuild it")

    def block_io(prefix: str) -> tuple[str, str]:
        """The one activation entering the nodes named prefix*, and the one leaving them."""
        block = [n for n in g.node if n.name.startswith(prefix)]
        inside = {n.name for n in block}
        made = [o for n in block for o in n.output if o]
        ins = list(dict.fromkeys(x for n in block for x in n.input if x and x not in made and x not in consts))
        outs = [o for o in made if o in graph_out or any(c not in inside for c in consumers.get(o, []))]
        if len(ins) != 1 or len(outs) != 1:
            raise missing(f"single input and output of {prefix}*")
        return ins[0], outs[0]

    def residual(norm: str) -> str:
        """The residual stream the norm `norm` adds the previous layer's output to."""
        fused = by_name.get(f"{norm}/SkipSimplifiedLayerNorm")  # the CPU graph: output 3 is input + skip
        if fused is not None and len(fused.output) > 3 and fused.output[3]:
            return fused.output[3]
        add = by_name.get(f"{norm}/residual/Add")
        if add is None:
            raise missing(f"residual add of {norm}")
        return add.output[0]

    embed = next((n for n in g.node if n.name.startswith("/model/embed_tokens/")), None)
    if embed is None:
        raise missing("embedding node /model/embed_tokens/*")
    taps = [Tap(None, "embedding", embed.output[0], "embed")]
    for i in range(n_layers):
        pre = f"/model/layers.{i}"
        attn, o = block_io(f"{pre}/attn/{ROLES['o']}/")
        _, mlp = block_io(f"{pre}/mlp/{ROLES['down']}/")
        nxt = f"/model/layers.{i + 1}/input_layernorm" if i + 1 < n_layers else "/model/norm"
        taps += [Tap(i, "attention", attn, f"layers.{i}.attention"), Tap(i, "o_proj", o, f"layers.{i}.attention.wo"),
                 Tap(i, "mlp", mlp, f"layers.{i}.feed_forward"), Tap(i, "residual", residual(nxt), f"layers.{i}")]
    if "logits" not in graph_out:
        raise missing("logits output")
    return taps + [Tap(None, "logits", "logits", "logits")]


def _feed(manifest: dict, ids: list[int]) -> dict:
    """The graph's inputs for one teacher-forced prefill of ids from an empty cache, with the logits of
    every position: num_logits_to_keep 0 where the graph requires it (the TensorRT graph); the CPU
    graph's optional one keeps its default, 0 (ONNX Runtime lists it as an initializer, not an input)."""
    S = len(ids)
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, S), np.int64),
            "position_ids": np.arange(S, dtype=np.int64)[None]}
    for name, spec in manifest["io"]["inputs"].items():
        if name == "num_logits_to_keep":
            if not spec.get("optional"):
                feed[name] = np.array(0, np.int64)
        elif name.startswith("past_key_values."):
            # [batch, kv_heads, past_seq, head_dim]: empty, or the in-place TensorRT graph's static
            # max-length buffer (zeros: its rows past the mask are never read)
            length = spec["shape"][2] if isinstance(spec["shape"][2], int) else 0
            feed[name] = np.zeros([1, spec["shape"][1], length, spec["shape"][3]], np.dtype(spec["dtype"]))
    return feed


# ---------------------------------------------------------------------------------------------- the runners
def _polygraphy():
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise LlamaExportError("--layerwise runs the graph with Polygraphy, which is not installed "
                               "(pip install 'llamaexport[build]', or pip install polygraphy)") from None
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False  # else it asks for the `colored` package on its first message
    return G_LOGGER


def _polygraphy_error(e: Exception, what: str) -> LlamaExportError:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return LlamaExportError(f"{what} failed: {first}")


def run_onnxruntime(onnx_path: Path, taps: list[Tap], feed: dict, *, graph=None) -> dict:
    """Run the graph with ONNX Runtime (CPU), every tap marked as an output: {tensor: array}.

    The graph is read without its weights (external data), marked with Polygraphy's ModifyOutputs
    and handed to ONNX Runtime as bytes, with the artifact's directory as the folder of its external
    data: the weights are read where they are (ONNX Runtime refuses external data reached through a
    link from another directory), and nothing is written."""
    import onnxruntime as ort

    log = _polygraphy()
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner

    def session():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as the runtime runs it
        so.log_severity_level = 3  # errors only (num_logits_to_keep is an overridable initializer)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_path.parent))
        # Polygraphy's SessionFromOnnx takes no session options, hence this loader of our own
        return ort.InferenceSession(marked.SerializeToString(), so, providers=["CPUExecutionProvider"])

    try:
        with log.verbosity(QUIET):
            model = graph if graph is not None else OnnxFromPath(str(onnx_path), ignore_external_data=True)()
            marked = ModifyOutputs(model, outputs=list(dict.fromkeys(t.tensor for t in taps)))()
            with OnnxrtRunner(session) as runner:
                return dict(runner.infer(feed))
    except LlamaExportError:
        raise
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types (Fail, InvalidArgument, ...)
        raise _polygraphy_error(e, f"ONNX Runtime on {onnx_path} with the layer outputs marked") from None


def run_tensorrt(onnx_path: Path, taps: list[Tap], feed: dict, manifest: dict) -> dict:
    """Build a debug engine from the artifact's ONNX with every tap marked as an output (Polygraphy's
    NetworkFromOnnxPath + ModifyNetworkOutputs + EngineFromNetwork, one optimization profile of the
    feed's shapes), with our plugins and the strongly typed network tensorrt.builder.build_engine makes,
    and run it once with TrtRunner: {tensor: array}. Outputs can keep TensorRT from fusing across
    the marked tensors, so the debug engine's numbers are close to engine.plan's, not identical."""
    from llamaexport.tensorrt.api import require_tensorrt, trt_major
    from llamaexport.tensorrt.plugins import load_plugins

    trt = require_tensorrt("compare the artifact's ONNX run by ONNX Runtime with --backend onnxruntime",
                           what="the layerwise TensorRT comparison")
    log = _polygraphy()
    import polygraphy.backend.trt as pt

    load_plugins(trt)  # RoPE/SwiGLU as plugins when the library is here, as the real engine has them
    # no parser flags, as build_engine: our nodes' plugin_namespace selects the plugins, and
    # ENABLE_PLUGIN_OVERRIDE would turn our QKV Split into NVIDIA's Split plugin (tensorrt/builder.py)
    # TensorRT 11 networks are always strongly typed (the flag is deprecated); 10.x needs the flag
    strongly_typed = trt_major(trt) < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    profile = pt.Profile()
    for name, a in feed.items():
        if name == "num_logits_to_keep":  # a shape tensor: its profile holds values, not a shape
            profile.add(name, min=[int(a)], opt=[int(a)], max=[int(a)])
        else:
            profile.add(name, min=a.shape, opt=a.shape, max=a.shape)
    level = (manifest.get("engine") or {}).get("builder_optimization_level")
    try:
        with log.verbosity(QUIET):
            network = pt.ModifyNetworkOutputs(
                pt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed),
                # the graph's own outputs stay marked (ModifyNetworkOutputs unmarks the rest)
                outputs=list(dict.fromkeys([*(t.tensor for t in taps), *manifest["io"]["outputs"]])))
            # TF32 as build_engine sets it: off for fp32 artifacts, on otherwise
            config = pt.CreateConfig(profiles=[profile], tf32=manifest["precision"] != "fp32",
                                     builder_optimization_level=level)
            with pt.TrtRunner(pt.EngineFromNetwork(network, config=config)) as runner:
                # copies: the runner's host buffers go with it
                return {k: np.array(v, copy=True) for k, v in runner.infer(feed).items()}
    except LlamaExportError:
        raise
    except Exception as e:  # noqa: BLE001 - Polygraphy's, and TensorRT's bindings' (RuntimeError, TypeError, ...)
        raise _polygraphy_error(e, f"the TensorRT debug engine of {onnx_path}") from None


# ---------------------------------------------------------------------------------------------- the comparison
def compare(ref: np.ndarray, art: np.ndarray) -> dict:
    """RMS relative error ||art - ref|| / ||ref|| and max |art - ref| (NaN/inf if the artifact's are)."""
    r, a = ref.astype(np.float64), np.asarray(art).astype(np.float64)
    if r.shape != a.shape:
        raise LlamaExportError(f"a layer output has shape {list(a.shape)} where the reference has {list(r.shape)}; "
                               "rebuild the artifact")
    d = a - r
    return {"rel": float(np.sqrt((d * d).sum()) / max(np.sqrt((r * r).sum()), 1e-30)), "max_abs": float(np.abs(d).max())}


def layerwise(artifact, *, reference=None, backend: str | None = None, progress: bool = True) -> dict:
    """Compare an artifact's layer outputs with the reference's (module docstring); returns the report.

    backend: "onnxruntime", "tensorrt", or None: the manifest's, and for a TensorRT artifact ONNX
    Runtime too (skipped with its reason where TensorRT is not installed)."""
    from llamaexport.model.config import LlamaConfig
    from llamaexport.model.reference import build_reference, intermediates
    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.verify.parity import heldout_text, reference_checkpoint, require_reference_memory

    d = Path(artifact)
    manifest = read_manifest(d)
    require_intact(d, manifest)
    cfg = LlamaConfig.from_dict(manifest["model"])
    require_reference_memory(cfg)
    say = log if progress else (lambda s: None)

    backends, skipped = _backends(manifest, backend)
    onnx_path = d / manifest["files"]["onnx"]
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)  # the structure only: weights stay on disk
    taps = graph_taps(graph, cfg.n_layers)
    tok = None
    if manifest.get("tokenizer"):
        from llamaexport.model.tokenizer import load_tokenizer
        tok = load_tokenizer(d)
    # the start of check's held-out text: a prompt of a few tokens would judge each tensor on a handful
    # of rows; seeded random ids for an artifact without a tokenizer
    n = min(HELDOUT_TOKENS, cfg.max_seq_len - 1)
    if tok is not None:
        ids = LlamaModel(d, manifest, None, tok).encode(heldout_text())[:n]
    else:
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, n).tolist()
    feed = _feed(manifest, ids)

    say(f"layerwise: the reference on the held-out text ({len(ids)} tokens)")
    ckpt, ref_desc = reference_checkpoint(manifest, reference)
    ref = intermediates(build_reference(cfg, ckpt.weights), feed["input_ids"])
    del ckpt
    lims = budgets(manifest["precision"])
    rows = [{"layer": t.layer, "op": t.op, "tensor": t.tensor, "budget": lims["stream" if t.op in STREAM else "op"]}
            for t in taps]
    for row in rows:
        why = _not_compared(manifest, row["op"])
        if why:
            row["not_compared"] = why
    failures = []
    for name in backends:
        say(f"layerwise: {name}: {len(taps)} tensors marked as outputs")
        out = run_onnxruntime(onnx_path, taps, feed, graph=graph) if name == "onnxruntime" else \
            run_tensorrt(onnx_path, taps, feed, manifest)
        first = None
        for t, row in zip(taps, rows):
            if "not_compared" in row:
                continue
            c = compare(ref[t.ref], out[t.tensor])
            c["ok"] = bool(c["rel"] <= row["budget"])  # a NaN is never within the budget
            row[name] = c
            if first is None and not c["ok"]:
                first = {"backend": name, "layer": t.layer, "op": t.op, "tensor": t.tensor, "rel": c["rel"],
                         "budget": row["budget"]}
        if first:
            failures.append(first)
    return {"artifact": str(d), "precision": manifest["precision"], "reference": ref_desc, "prompt_tokens": len(ids),
            "metric": "rms_rel", "budgets": lims, "budget_rule": "stream: sqrt(2 * max_mean_kl), op: twice that",
            "backends": backends,
            "skipped": skipped, "rows": rows, "failures": failures, "passed": not failures}


def _not_compared(manifest: dict, op: str) -> str | None:
    """Why a tensor of this artifact has no reference counterpart, or None. AWQ divides the rows of
    v_proj by per-channel scales and multiplies o_proj's input channels by them (awq.apply_awq):
    o_proj's output is the reference's, the attention output before it is not (it is scaled)."""
    if op == "attention" and "awq" in (manifest.get("quantization") or ""):
        return "AWQ scales its channels (folded into v_proj and o_proj); o_proj's output is compared"
    return None


# TensorRT's KV-cache update layer must write into the memory of its cache input, and Polygraphy's
# runner binds every output to a buffer of its own
IN_PLACE_NOT_DEBUGGABLE = ("the TensorRT debug engine does not run the in-place KV cache graph (its cache update "
                           "must write into the input's memory, which Polygraphy's runner does not bind); compare "
                           "with --backend onnxruntime, or build the artifact with --kv-cache concat")


def _backends(manifest: dict, backend: str | None) -> tuple[list[str], dict]:
    in_place = manifest.get("backend") == "tensorrt" and KVForm.of(manifest) is KVForm.INPLACE
    if backend == "tensorrt":  # refused before the reference is built, not after
        from llamaexport.tensorrt.api import require_tensorrt
        require_tensorrt("compare the artifact's ONNX run by ONNX Runtime with --backend onnxruntime",
                         what="the layerwise TensorRT comparison")
        if in_place:
            raise LlamaExportError(IN_PLACE_NOT_DEBUGGABLE)
    if backend is not None:
        return [backend], {}
    if manifest.get("backend") != "tensorrt":
        return ["onnxruntime"], {}
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return ["onnxruntime"], {"tensorrt": "TensorRT is not installed here (pip install tensorrt on the GPU machine)"}
    if in_place:
        return ["onnxruntime"], {"tensorrt": IN_PLACE_NOT_DEBUGGABLE}
    return ["onnxruntime", "tensorrt"], {}


def format_layerwise(r: dict) -> str:
    """The report as a table of every compared tensor, then the verdict."""
    names = r["backends"]
    lines = [f"layerwise: {r['artifact']} ({r['precision']}) vs {r['reference']}",
             f"  held-out text, {r['prompt_tokens']} tokens, one teacher-forced prefill; "
             "RMS relative error per tensor (! = over its budget)",
             f"  budgets: embedding, residual, logits {r['budgets']['stream']:.3g} (sqrt(2 * max_mean_kl)); "
             f"attention, o_proj, mlp {r['budgets']['op']:.3g}"]
    for backend, why in r["skipped"].items():
        lines.append(f"  {backend}: skipped: {why}")
    for op, why in {row["op"]: row["not_compared"] for row in r["rows"] if "not_compared" in row}.items():
        lines.append(f"  {op}: not compared: {why}")
    lines.append(f"  {'layer':<7}{'op':<11}" + "".join(f"{n:>14}" for n in names) + "  tensor")
    for row in r["rows"]:
        layer = "-" if row["layer"] is None else str(row["layer"])
        if "not_compared" in row:
            cells = "".join(f"{'-':>13} " for _ in names)
            lines.append(f"  {layer:<7}{row['op']:<11}{cells}  {row['tensor']} (not compared)")
            continue
        cells = "".join(f"{row[n]['rel']:>13.3g}{' ' if row[n]['ok'] else '!'}" for n in names)
        lines.append(f"  {layer:<7}{row['op']:<11}{cells}  {row['tensor']}")
    if r["passed"]:
        lines.append("PASS: every tensor within the budget")
    else:
        lines.append("FAIL: " + "; ".join(
            f"{f['backend']}: first over the budget at "
            f"{'layer ' + str(f['layer']) + ' ' if f['layer'] is not None else ''}{f['op']} "
            f"({f['tensor']}): {f['rel']:.3g} > {f['budget']:.3g}" for f in r["failures"]))
    return "\n".join(lines)
