"""`llamaexport check --layerwise`: each decoder layer's outputs against the reference, and the first
layer and op over the budget named.

A tiny 4-layer HF checkpoint is built into artifacts (CPU fp32 / int8 / int4, the portable TensorRT
graph run by ONNX Runtime); a second checkpoint equal to it except for one weight of layer 2 serves as
`--reference`, so the artifact leaves that reference exactly at layer 2, in the op that weight feeds.
"""

import importlib.util
import json
import shutil

import numpy as np
import pytest
from conftest import assert_clean_error, cli, make_hf_model, memoized_build, train_tiny_spm

from llamaexport.verify.layerwise import budgets, layerwise

N_LAYERS = 4
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(HF checkpoint dir, tokenizer path): 4 layers, vocabulary 512."""
    d = tmp_path_factory.mktemp("layerwise")
    make_hf_model(d / "hf", num_hidden_layers=N_LAYERS, vocab_size=512)
    return d / "hf", train_tiny_spm(d)


@pytest.fixture(scope="module")
def artifact(ckpt, tmp_path_factory):
    """build(**options) of the checkpoint, made once per distinct options."""
    return memoized_build(tmp_path_factory, "art", checkpoint=ckpt[0], tokenizer=str(ckpt[1]))


def changed_reference(ckpt, tmp_path, weight: str):
    """A copy of the checkpoint whose layers.2 `weight` (HF name) has noise of twice its RMS added."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "ref"
    shutil.copytree(ckpt[0], out)
    tensors = load_file(out / "model.safetensors")
    w = tensors[f"model.layers.2.{weight}.weight"]
    rng = np.random.default_rng(0)
    tensors[f"model.layers.2.{weight}.weight"] = w + rng.standard_normal(w.shape).astype(w.dtype) * 2 * np.sqrt((w ** 2).mean())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def compared(report, backend="onnxruntime"):
    return [r for r in report["rows"] if "not_compared" not in r and backend in r]


def test_budgets_are_derived_from_the_kl_threshold():
    from llamaexport.verify.parity import thresholds

    for p in ("fp32", "fp16", "int8", "int4", "w8a8"):
        b = budgets(p)
        assert b["stream"] == pytest.approx((2 * thresholds(p)["max_mean_kl"]) ** 0.5) and b["op"] == 2 * b["stream"]
    stream = [budgets(p)["stream"] for p in ("fp32", "fp16", "int8", "w8a8", "int4")]
    assert stream == sorted(stream)


def test_fp32_every_layer_within_budget(artifact):
    """Exit 0, and every layer's four tensors (plus embedding and logits) compared and within budget."""
    art = artifact(precision="fp32")
    before = {f.name: f.stat().st_mtime_ns for f in art.iterdir()}
    r = cli("check", art, "--layerwise", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["failures"] == [] and report["backends"] == ["onnxruntime"]
    ops = [(row["layer"], row["op"]) for row in report["rows"]]
    assert ops == [(None, "embedding"), *[(i, op) for i in range(N_LAYERS)
                                          for op in ("attention", "o_proj", "mlp", "residual")], (None, "logits")]
    assert len(compared(report)) == len(ops)
    for row in report["rows"]:  # fp32 against the fp32 reference: float rounding only
        assert row["onnxruntime"]["rel"] < 1e-5 and row["onnxruntime"]["ok"], row
    assert "/attn/GroupQueryAttention/" in report["rows"][1]["tensor"]  # the CPU graph's fused attention
    # a diagnosis, not the parity verdict: no parity.json, the manifest untouched, nothing written there
    assert {f.name: f.stat().st_mtime_ns for f in art.iterdir()} == before and "parity.json" not in before


def test_reference_intermediates_add_up(ckpt):
    """model.intermediates captures what its names say: each layer's output is its input plus the
    attention's o_proj output plus the MLP output, and its logits are the forward's."""
    import torch

    from llamaexport.model.checkpoint import load_checkpoint
    from llamaexport.model.reference import build_reference, intermediates

    ck = load_checkpoint(ckpt[0])
    model = build_reference(ck.config, ck.weights)
    ids = np.array([[1, 5, 9, 200, 7, 3]])
    t = intermediates(model, ids)
    h = t["embed"]
    for i in range(N_LAYERS):
        assert t[f"layers.{i}.attention"].shape == (1, 6, ck.config.n_heads * ck.config.head_dim)
        np.testing.assert_allclose(t[f"layers.{i}"], h + t[f"layers.{i}.attention.wo"] + t[f"layers.{i}.feed_forward"],
                                   rtol=1e-5, atol=1e-6)
        h = t[f"layers.{i}"]
    with torch.no_grad():
        logits, _ = model(torch.as_tensor(ids), torch.ones(1, 6, dtype=torch.int64), torch.arange(6)[None],
                          model.empty_cache(1))
    np.testing.assert_array_equal(t["logits"], logits.numpy())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # hooks removed


@pytest.mark.parametrize("weight,op", [("self_attn.v_proj", "attention"), ("self_attn.o_proj", "o_proj"),
                                       ("mlp.down_proj", "mlp")])
def test_names_the_layer_and_op_that_diverges(artifact, ckpt, tmp_path, weight, op):
    ref = changed_reference(ckpt, tmp_path, weight)
    report = layerwise(artifact(precision="fp32"), reference=ref, progress=False)
    assert not report["passed"]
    first = report["failures"][0]
    assert (first["backend"], first["layer"], first["op"]) == ("onnxruntime", 2, op)
    assert first["rel"] > 10 * first["budget"] and first["budget"] == budgets("fp32")["op"]
    for row in report["rows"]:  # everything before the changed weight still matches
        if row["layer"] is None and row["op"] == "embedding" or row["layer"] is not None and row["layer"] < 2:
            assert row["onnxruntime"]["ok"], row


def test_cli_exit_code_and_message(artifact, ckpt, tmp_path):
    ref = changed_reference(ckpt, tmp_path, "self_attn.v_proj")
    r = cli("check", artifact(precision="fp32"), "--layerwise", "--reference", ref)
    assert r.returncode == 2, (r.stdout, r.stderr)
    verdict = r.stdout.strip().splitlines()[-1]
    assert verdict.startswith("FAIL: onnxruntime: first over the budget at layer 2 attention "
                              "(/model/layers.2/attn/GroupQueryAttention/output_0)"), verdict
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kv_cache", ["inplace", "concat"])
def test_portable_tensorrt_graph_through_onnx_runtime(artifact, ckpt, tmp_path, kv_cache):
    """The TensorRT profile's graph in each KV-cache form (--export-only: our RoPE/SwiGLU ops, fp16; the
    in-place form's static max-length cache and required num_logits_to_keep), run by ONNX Runtime."""
    art = artifact(profile="rtx4090", precision="fp16", export_only=True, kv_cache=kv_cache)
    report = layerwise(art, backend="onnxruntime", progress=False)
    assert report["passed"], report["failures"]
    assert len(compared(report)) == 2 + 4 * N_LAYERS
    assert report["rows"][1]["tensor"] == "/model/layers.0/attn/o/Merge/output_0"  # the portable attention
    worst = max(r["onnxruntime"]["rel"] for r in report["rows"])
    assert 1e-5 < worst < budgets("fp16")["stream"] / 10  # fp16 rounding shows, well within the budget

    bad = layerwise(art, reference=changed_reference(ckpt, tmp_path, "self_attn.v_proj"), backend="onnxruntime",
                    progress=False)
    first = bad["failures"][0]
    assert (first["layer"], first["op"], first["tensor"]) == (2, "attention", "/model/layers.2/attn/o/Merge/output_0")


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the GPU test below runs it")
def test_tensorrt_artifact_without_tensorrt(artifact):
    """No backend given: ONNX Runtime runs the graph and TensorRT is reported skipped, with the reason;
    --backend tensorrt is refused in one line before any work."""
    art = artifact(profile="rtx4090", precision="fp16", export_only=True)
    r = cli("check", art, "--layerwise")
    assert r.returncode == 0, r.stderr
    assert "tensorrt: skipped: TensorRT is not installed here" in r.stdout
    assert_clean_error(cli("check", art, "--layerwise", "--backend", "tensorrt"),
                       "the layerwise TensorRT comparison needs TensorRT", "--backend onnxruntime")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_cpu_artifacts(artifact, ckpt, tmp_path, precision):
    """AWQ-calibrated int8/int4 (MatMulNBits) pass; AWQ's scaled attention output is left out with the
    reason, so a changed v_proj is found at the o_proj that follows it."""
    art = artifact(precision=precision)
    report = layerwise(art, progress=False)
    assert report["passed"], report["failures"]
    assert json.loads((art / "manifest.json").read_text())["quantization"].startswith("awq")
    skipped = [r for r in report["rows"] if "not_compared" in r]
    assert [r["op"] for r in skipped] == ["attention"] * N_LAYERS and "AWQ" in skipped[0]["not_compared"]
    assert all("/MatMulNBits/" in r["tensor"] for r in report["rows"] if r["op"] in ("o_proj", "mlp"))
    assert max(r["onnxruntime"]["rel"] for r in compared(report)) > 1e-3  # quantization error is measured

    bad = layerwise(art, reference=changed_reference(ckpt, tmp_path, "self_attn.v_proj"), progress=False)
    assert (bad["failures"][0]["layer"], bad["failures"][0]["op"]) == (2, "o_proj")


# ------------------------------------------------------------------------------------------ GPU + TensorRT
@pytest.fixture(scope="module")
def trt_artifact(artifact, tmp_path_factory):
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from test_tensorrt import _gpu_profile

    prof = _gpu_profile(tmp_path_factory.mktemp("gpu"), torch, batch=1)
    return artifact(profile=str(prof), precision="fp16")


def test_tensorrt_debug_engine(trt_artifact, ckpt, tmp_path):
    """A TensorRT artifact with TensorRT here: ONNX Runtime and a debug engine both compared, both within
    budget; with a changed layer 2, both name it."""
    report = layerwise(trt_artifact, progress=False)
    assert report["backends"] == ["onnxruntime", "tensorrt"] and report["skipped"] == {}
    assert report["passed"], report["failures"]
    assert len(compared(report, "tensorrt")) == 2 + 4 * N_LAYERS
    bad = layerwise(trt_artifact, reference=changed_reference(ckpt, tmp_path, "mlp.down_proj"), progress=False)
    assert [(f["backend"], f["layer"], f["op"]) for f in bad["failures"]] == [("onnxruntime", 2, "mlp"),
                                                                              ("tensorrt", 2, "mlp")]
