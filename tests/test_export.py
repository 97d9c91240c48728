"""Graph tier: ONNX names, shapes, custom ops, and values against the reference (tiny configs), for
each form of the portable graph: the concat KV cache (MatMul/Softmax attention, every TensorRT 10.x)
and the in-place one (TensorScatter + the Attention op, TensorRT >= 10.15), both run by ONNX Runtime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llamaexport.build.export import export_onnx
from llamaexport.build.recipe import Recipe
from llamaexport.model.checkpoint import load_checkpoint
from llamaexport.model.reference import build_reference

FORMS = ["concat", "inplace"]


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=[(size, kv) for size in ("tiny", "tiny-mha", "tiny-llama3") for kv in FORMS],
                ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory):
    size, kv = request.param
    d = tmp_path_factory.mktemp(size + kv)
    ck = load_checkpoint(size=size, seed=3, max_seq_len=64)
    spec = export_onnx(ck, d, Recipe.resolve(precision="fp32", target="portable", kv_cache=kv), progress=False)
    return ck, spec, d, _session(d / "model.onnx"), kv


def test_io_names_and_shapes_follow_the_contract(exported):
    ck, spec, d, sess, kv = exported
    cfg = ck.config
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(str(d / "model.onnx"))
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    assert ins[:4] == ["input_ids", "attention_mask", "position_ids", "num_logits_to_keep"]
    assert ins[4:] == [f"past_key_values.{i}.{k}" for i in range(cfg.n_layers) for k in ("key", "value")]
    assert outs == ["logits"] + [f"present.{i}.{k}" for i in range(cfg.n_layers) for k in ("key", "value")]
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    # the in-place cache is one static max-length buffer (TensorRT's KV-cache update wants a static length)
    past = cfg.max_seq_len if kv == "inplace" else "past_seq"
    assert dims(model.graph.input[4]) == ["batch", cfg.n_kv_heads, past, cfg.head_dim]
    assert dims(model.graph.output[1])[2] == (cfg.max_seq_len if kv == "inplace" else "total_seq")
    assert dims(model.graph.output[0]) == ["batch", "logits_seq", cfg.vocab_size]
    # a required input: TensorRT would read an input with a default initializer as that constant
    assert "num_logits_to_keep" not in {t.name for t in model.graph.initializer}
    assert dims(model.graph.input[3]) == [] and not spec["inputs"]["num_logits_to_keep"].get("optional")
    assert max(o.version for o in model.opset_import if o.domain == "") == (24 if kv == "inplace" else 21)
    # weights live in the external data file, not in the protobuf
    assert (d / "model.onnx.data").stat().st_size > 4 * cfg.n_params() * 0.9
    assert (d / "model.onnx").stat().st_size < 1_000_000
    assert spec["inputs"]["input_ids"]["dtype"] == "int64"


def test_attention_is_in_the_form_tensorrt_fuses(exported):
    """concat: MatMul -> Add(bias) -> Softmax -> MatMul with nothing between (no float32 Cast, no
    Reshape), all in the activation dtype; inplace: TensorScatter into the past buffer (its output the
    present) and one Attention node per layer, whose 4-D mask and lack of past inputs are what
    TensorRT's parser maps to IAttention."""
    ck, _, d, _, kv = exported
    g = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    by_output = {o: n for n in g.node for o in n.output}
    L = ck.config.n_layers
    ops = [n.op_type for n in g.node]
    assert "Cast" not in {by_output[i].op_type for n in g.node if n.op_type == "Softmax" for i in n.input}
    if kv == "concat":
        assert ops.count("Softmax") == L and "Attention" not in ops and "TensorScatter" not in ops
        for n in g.node:
            if n.op_type == "Softmax":
                add = by_output[n.input[0]]
                assert add.op_type == "Add" and by_output[add.input[0]].op_type == "MatMul"
                assert [m.op_type for m in g.node if n.output[0] in m.input] == ["MatMul"]
        assert {by_output[f"present.{i}.key"].op_type for i in range(L)} == {"Concat"}
    else:
        att = [n for n in g.node if n.op_type == "Attention"]
        assert len(att) == L and "Softmax" not in ops and "Concat" not in {by_output[o].op_type for o in
                                                                            [o.name for o in g.output][1:]}
        assert all(len(n.input) == 4 and {a.name: a.f for a in n.attribute}["scale"] == 1.0 for n in att)
        scatter = by_output["present.0.key"]
        assert scatter.op_type == "TensorScatter" and scatter.input[0] == "past_key_values.0.key"
        assert {a.name: (a.i or a.s) for a in scatter.attribute} == {"axis": -2, "mode": b"linear"}


def test_custom_ops_carry_plugin_attributes_and_function_bodies(exported):
    ck, _, d, _, _ = exported
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


def _feed(cfg, ids, mask, pos, past=None, *, kv="concat", keep=0, dtype=np.float32):
    """The graph's inputs; an empty cache is [B, K, 0, hd] (concat) or a zeroed max-length buffer (inplace)."""
    B = ids.shape[0]
    f = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "num_logits_to_keep": np.array(keep, np.int64)}
    length = cfg.max_seq_len if kv == "inplace" else 0
    for i in range(cfg.n_layers):
        for j, k in enumerate(("key", "value")):
            f[f"past_key_values.{i}.{k}"] = past[2 * i + j] if past else \
                np.zeros((B, cfg.n_kv_heads, length, cfg.head_dim), dtype)
    return f


def test_values_match_reference_prefill_and_decode_with_left_padding(exported):
    ck, _, _, sess, kv = exported
    cfg = ck.config
    ref = build_reference(cfg, ck.weights)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, :4] = 0
    mask[2, :8] = 0
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    out = sess.run(None, _feed(cfg, ids, mask, pos, kv=kv))
    with torch.no_grad():
        want, past = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(pos), ref.empty_cache(3))
    real = mask.astype(bool)
    assert np.abs(out[0] - want.numpy())[real].max() < 1e-4
    for step in range(3):  # decode through the cache, the last position's logits only
        nxt = rng.integers(0, cfg.vocab_size, (3, 1))
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        out = sess.run(None, _feed(cfg, nxt, mask, pos, out[1:], kv=kv, keep=1))
        with torch.no_grad():
            want, past = ref(torch.tensor(nxt), torch.tensor(mask), torch.tensor(pos), past)
        assert np.abs(out[0] - want.numpy()).max() < 1e-4
        T = 9 + step + 1
        assert out[1].shape == (3, cfg.n_kv_heads, cfg.max_seq_len if kv == "inplace" else T, cfg.head_dim)
        np.testing.assert_allclose(out[1][:, :, :T], past[0][0].numpy(), atol=1e-5)


def test_num_logits_to_keep_selects_the_last_positions(exported):
    """0 = every position; n = the last n, equal to those rows of the full output."""
    ck, _, _, sess, kv = exported
    cfg = ck.config
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 7))
    args = (cfg, ids, np.ones((2, 7), np.int64), np.arange(7)[None].repeat(2, 0))
    full = sess.run(["logits"], _feed(*args, kv=kv))[0]
    assert full.shape == (2, 7, cfg.vocab_size)
    for n in (1, 3, 7):
        got = sess.run(["logits"], _feed(*args, kv=kv, keep=n))[0]
        assert got.shape == (2, n, cfg.vocab_size)
        np.testing.assert_allclose(got, full[:, -n:], atol=1e-5)


def test_chunked_prefill_equals_one_pass(exported):
    ck, _, _, sess, kv = exported
    cfg = ck.config
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 20))
    full = sess.run(None, _feed(cfg, ids, np.ones((1, 20), np.int64), np.arange(20)[None], kv=kv))[0]
    a = sess.run(None, _feed(cfg, ids[:, :13], np.ones((1, 13), np.int64), np.arange(13)[None], kv=kv))
    b = sess.run(None, _feed(cfg, ids[:, 13:], np.ones((1, 20), np.int64), np.arange(13, 20)[None], a[1:], kv=kv))
    np.testing.assert_allclose(np.concatenate([a[0], b[0]], 1), full, atol=1e-5)


def test_inplace_rows_of_their_own_lengths_in_one_buffer(tmp_path):
    """The in-place graph writes row b's new tokens after its last real column, so rows of different
    lengths decode together in one buffer without padding (what runtime.slots.InplaceSlots relies on): a row
    whose mask is 1 up to its length and 0 after, fed a token at that length, equals the reference on
    that row alone; the buffer holds each row's entries at its own positions, the stale ones past it
    untouched."""
    ck = load_checkpoint(size="tiny", seed=3, max_seq_len=32)
    cfg = ck.config
    export_onnx(ck, tmp_path, Recipe.resolve(precision="fp32", target="portable", kv_cache="inplace"), progress=False)
    sess = _session(tmp_path / "model.onnx")
    ref = build_reference(cfg, ck.weights)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, cfg.vocab_size, n) for n in (6, 3, 9)]
    past = None
    for r, p in enumerate(prompts):  # prefill each row alone into its row of a shared 3-row buffer
        feed = _feed(cfg, p[None], np.ones((1, len(p)), np.int64), np.arange(len(p))[None], kv="inplace")
        if past is not None:
            for j, name in enumerate(n for n in feed if n.startswith("past")):
                feed[name] = past[j][r:r + 1]
        rows = sess.run(None, feed)[1:]
        past = [np.zeros((3, *x.shape[1:]), x.dtype) for x in rows] if past is None else past
        for j, x in enumerate(rows):
            past[j][r] = x[0]
    lens = np.array([len(p) for p in prompts])
    T = lens.max() + 1
    mask = (np.arange(T)[None] <= lens[:, None]).astype(np.int64)  # right-padded: 1 up to each row's new token
    nxt = rng.integers(0, cfg.vocab_size, (3, 1))
    out = sess.run(None, _feed(cfg, nxt, mask, lens[:, None], past, kv="inplace", keep=1))
    for r, p in enumerate(prompts):
        seq = torch.tensor(np.concatenate([p, nxt[r]])[None])
        with torch.no_grad():
            want, present = ref(seq, torch.ones_like(seq), torch.arange(seq.shape[1])[None], ref.empty_cache(1))
        assert np.abs(out[0][r, -1] - want[0, -1].numpy()).max() < 1e-4
        n = lens[r] + 1
        np.testing.assert_allclose(out[1][r, :, :n], present[0][0][0].numpy(), atol=1e-5)
        assert not out[1][r, :, n:].any()  # nothing written past the row's own length


@pytest.mark.parametrize("kv", FORMS)
def test_fp16_graph_is_within_the_fp16_budget(tmp_path, kv):
    """fp16 weights, activations, scores and softmax (no float32 detour): the logits stay within fp16
    rounding of the float32 reference, prefill and decode."""
    ck = load_checkpoint(size="tiny", seed=3, max_seq_len=64)
    cfg = ck.config
    export_onnx(ck, tmp_path, Recipe.resolve(precision="fp16", target="portable", kv_cache=kv), progress=False)
    sess = _session(tmp_path / "model.onnx")
    ref = build_reference(cfg, ck.weights)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 11))
    mask = np.ones((2, 11), np.int64)
    mask[1, :5] = 0
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    out = sess.run(None, _feed(cfg, ids, mask, pos, kv=kv, dtype=np.float16))
    with torch.no_grad():
        want, past = ref(torch.tensor(ids), torch.tensor(mask), torch.tensor(pos), ref.empty_cache(2))
    assert out[0].dtype == np.float32 and np.abs(out[0] - want.numpy())[mask.astype(bool)].max() < 5e-3
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    nxt = np.array([[7], [300]])
    out = sess.run(None, _feed(cfg, nxt, mask, pos[:, -1:] + 1, out[1:], kv=kv, keep=1))
    with torch.no_grad():
        want, _ = ref(torch.tensor(nxt), torch.tensor(mask), torch.tensor(pos[:, -1:] + 1), past)
    assert np.isfinite(out[0]).all() and np.abs(out[0] - want.numpy()).max() < 5e-3
