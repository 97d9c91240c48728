"""Quantization arithmetic against ONNX Runtime's own kernels, and AWQ folding exactness."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llamaexport import quantize as Q
from llamaexport.awq import LayerwiseCalibrator, apply_awq
from llamaexport.checkpoint import load_checkpoint


def _run(nodes, inits, x, n_out, opsets=(("", 21), ("com.microsoft", 1))):
    """Run without graph optimizations: ORT would otherwise fuse DequantizeLinear + MatMul into
    MatMulNBits with int8 activations, and this test is about the exact dequantized values."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], n_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bits,block,K", [(4, 32, 256), (4, 16, 80), (4, 128, 300), (8, 32, 256), (8, 64, 100)])
def test_matmul_nbits_packing_matches_onnxruntime(bits, block, K):
    rng = np.random.default_rng(bits * block + K)
    N = 24
    w = rng.normal(size=(K, N)).astype(np.float32)
    x = rng.normal(size=(3, K)).astype(np.float32)
    blob, scale, zp = Q.matmul_nbits(w, bits=bits, block=block)
    deq = Q.dequant_matmul_nbits(blob, scale, zp, K=K, N=N, bits=bits, block=block)
    assert ((deq - w) ** 2).mean() < (scale ** 2).mean() / 6  # about rounding error (step^2 / 12)
    inits = [numpy_helper.from_array(blob, "B"), numpy_helper.from_array(scale, "S"), numpy_helper.from_array(zp, "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=K, N=N,
                            bits=bits, block_size=block, accuracy_level=0)
    np.testing.assert_allclose(_run([node], inits, x, N), x @ deq, atol=1e-4, rtol=1e-5)


def test_portable_int4_and_int8_dequantize_like_onnxruntime():
    rng = np.random.default_rng(0)
    K, N = 128, 16
    w = rng.normal(size=(K, N)).astype(np.float32)
    x = rng.normal(size=(2, K)).astype(np.float32)
    q, s = Q.int4_blockwise(w, 32)
    qt = helper.make_tensor("Q", TensorProto.INT4, [K, N], Q.pack_int4(q), raw=True)
    nodes = [helper.make_node("DequantizeLinear", ["Q", "S"], ["W"], axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    deq = (q.reshape(K // 32, 32, N) * s[:, None, :]).reshape(K, N)
    np.testing.assert_allclose(_run(nodes, [qt, numpy_helper.from_array(s, "S")], x, N), x @ deq, atol=1e-4)
    np.testing.assert_allclose(Q.fake_quant(w, precision="int4", target="portable", block=32), deq)
    q8, s8 = Q.int8_per_channel(w)
    nodes = [helper.make_node("DequantizeLinear", ["Q", "S"], ["W"], axis=1), helper.make_node("MatMul", ["x", "W"], ["y"])]
    out = _run(nodes, [numpy_helper.from_array(q8, "Q"), numpy_helper.from_array(s8, "S")], x, N)
    np.testing.assert_allclose(out, x @ (q8 * s8), atol=1e-4)
    assert np.abs(q8 * s8 - w).max() < np.abs(w).max() / 100


def test_clipping_search_never_loses_to_plain_rounding():
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(256, 64)).astype(np.float32)  # heavy tails: outliers
    q, s = Q.int4_blockwise(w, 32)
    mse = ((q.reshape(8, 32, 64) * s[:, None] - w.reshape(8, 32, 64)) ** 2).mean()
    wb = w.reshape(8, 32, 64)
    s0 = np.abs(wb).max(1, keepdims=True) / 7
    mse0 = ((np.clip(np.rint(wb / s0), -8, 7) * s0 - wb) ** 2).mean()
    assert mse < mse0


@pytest.mark.parametrize("size", ["tiny", "tiny-mha"])
def test_awq_folding_preserves_the_float_function(size):
    """With an identity quantizer the folded scales must cancel exactly (GQA included)."""
    from llamaexport.model import Block

    ck = load_checkpoint(size=size, seed=2)
    cfg = ck.config
    w = {k[len("layers.0."):]: ck.weights[k] for k in ck.weights if k.startswith("layers.0.")}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    cal = LayerwiseCalibrator(cfg, ids, ck.weights["tok_embeddings.weight"])
    h0 = cal.h.clone()
    acts = cal.layer(w)
    # a crude quantizer that still rewards activation-aware scaling, so the search picks alpha > 0
    folded = apply_awq(cfg, w, acts, lambda wt: np.round(wt * 8) / 8)
    for k in ("attention_norm.weight", "ffn_norm.weight", "feed_forward.w3.weight", "attention.wv.weight"):
        assert not np.allclose(folded[k], w[k]), f"{k} was not rescaled"

    def run(weights):
        with torch.device("meta"):
            b = Block(cfg)
        b.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, assign=True)
        with torch.no_grad():
            return b(h0, cal.cos, cal.sin, cal.bias, cal.empty, cal.empty)[0]

    torch.testing.assert_close(run(folded), run(w), atol=1e-4, rtol=1e-4)


def test_chunked_quantization_equals_whole_matrix(monkeypatch):
    """Big matrices are quantized a column chunk at a time (bounded memory); same result."""
    w = np.random.default_rng(3).standard_normal((96, 200)).astype(np.float32)
    whole = [Q.matmul_nbits(w, bits=4, block=32), Q.matmul_nbits(w, bits=8, block=32),
             Q.int8_per_channel(w), Q.int4_blockwise(w, 32)]
    monkeypatch.setattr(Q, "CHUNK_ELEMENTS", 96 * 7)
    chunked = [Q.matmul_nbits(w, bits=4, block=32), Q.matmul_nbits(w, bits=8, block=32),
               Q.int8_per_channel(w), Q.int4_blockwise(w, 32)]
    for a, b in zip(whole, chunked):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
