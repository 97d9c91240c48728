"""Graph tier: ONNX names, shapes, custom ops, and values against the reference (tiny configs)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llamaexport.checkpoint import load_checkpoint
from llamaexport.export import export_onnx
from llamaexport.model import build_reference
from llamaexport.recipe import Recipe


@pytest.fixture(scope="module", params=["tiny", "tiny-mha", "tiny-llama3"])
def exported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ck = load_checkpoint(size=request.param, seed=3)
    spec = export_onnx(ck, d, Recipe.resolve(precision="fp32", target="portable"), progress=False)
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    return ck, spec, d, sess


def test_io_names_and_shapes_follow_the_contract(exported):
    ck, spec, d, sess = exported
    cfg = ck.config
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(str(d / "model.onnx"))
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    assert ins[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins[3:] == [f"past_key_values.{i}.{k}" for i in range(cfg.n_layers) for k in ("key", "value")]
    assert outs == ["logits"] + [f"present.{i}.{k}" for i in range(cfg.n_layers) for k in ("key", "value")]
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[3]) == ["batch", cfg.n_kv_heads, "past_seq", cfg.head_dim]
    assert dims(model.graph.output[0]) == ["batch", "seq", cfg.vocab_size]
    assert max(o.version for o in model.opset_import if o.domain == "") <= 24
    # weights live in the external data file, not in the protobuf
    assert (d / "model.onnx.data").stat().st_size > 4 * cfg.n_params() * 0.9
    assert (d / "model.onnx").stat().st_size < 1_000_000
    assert spec["inputs"]["input_ids"]["dtype"] == "int64"


def test_custom_ops_carry_plugin_attributes_and_function_bodies(exported):
    ck, _, d, _ = exported
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    custom = [n for n in model.graph.node if n.domain == "llamaexport"]
    assert {n.op_type for n in custom} == {"RoPE", "SwiGLU"}
    assert len(custom) == 3 * ck.config.n_layers
    for n in custom:
        attrs = {a.name: a for a in n.attribute}
        assert attrs["plugin_namespace"].s == b"llamaexport" and attrs["plugin_version"].s == b"1"
        if n.op_type == "RoPE":
            assert attrs["rotary_dim"].i == ck.config.rope_dim and attrs["interleaved"].i == 1
    assert {(f.domain, f.name) for f in model.functions} == {("llamaexport", "RoPE"), ("llamaexport", "SwiGLU")}
    assert all(n.name.startswith("/model/") or n.name.startswith("/lm_head/") for n in model.graph.node)


def _feed(cfg, ids, mask, pos, past=None):
    B = ids.shape[0]
    f = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(cfg.n_layers):
        for j, k in enumerate(("key", "value")):
            f[f"past_key_values.{i}.{k}"] = past[2 * i + j] if past else \
                np.zeros((B, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    return f


def test_values_match_reference_prefill_and_decode_with_left_padding(exported):
    ck, _, _, sess = exported
    cfg = ck.config
    ref = build_reference(cfg, ck.weights)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, :4] = 0
    mask[2, :8] = 0
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    out = sess.run(None, _feed(cfg, ids, mask, pos))
    with torch.no_grad():
        want, past = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(pos), ref.empty_cache(3))
    real = mask.astype(bool)
    assert np.abs(out[0] - want.numpy())[real].max() < 1e-4
    for step in range(3):  # decode through the cache
        nxt = rng.integers(0, cfg.vocab_size, (3, 1))
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        out = sess.run(None, _feed(cfg, nxt, mask, pos, out[1:]))
        with torch.no_grad():
            want, past = ref(torch.tensor(nxt), torch.tensor(mask), torch.tensor(pos), past)
        assert np.abs(out[0] - want.numpy()).max() < 1e-4
        assert out[1].shape == (3, cfg.n_kv_heads, 9 + step + 1, cfg.head_dim)
        np.testing.assert_allclose(out[1], past[0][0].numpy(), atol=1e-5)


def test_chunked_prefill_equals_one_pass(exported):
    ck, _, _, sess = exported
    cfg = ck.config
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 20))
    full = sess.run(None, _feed(cfg, ids, np.ones((1, 20), np.int64), np.arange(20)[None]))[0]
    a = sess.run(None, _feed(cfg, ids[:, :13], np.ones((1, 13), np.int64), np.arange(13)[None]))
    b = sess.run(None, _feed(cfg, ids[:, 13:], np.ones((1, 20), np.int64), np.arange(13, 20)[None], a[1:]))
    np.testing.assert_allclose(np.concatenate([a[0], b[0]], 1), full, atol=1e-5)
