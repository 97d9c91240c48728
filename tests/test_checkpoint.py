"""Checkpoint formats (HF single/sharded, Meta model-parallel shards, GGUF) and strict errors."""

import json

import numpy as np
import pytest
import torch
from conftest import make_hf_model

from llamaexport import LlamaExportError
from llamaexport.model.checkpoint import load_checkpoint, random_checkpoint
from llamaexport.model.reference import build_reference


def _logits(ck, ids):
    ref = build_reference(ck.config, ck.weights)
    with torch.no_grad():
        out, _ = ref(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], ref.empty_cache(1))
    return out


IDS = torch.arange(3, 40)[None] * 7 % 300


def hf_to_meta_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (HF halves -> Meta interleaved), written independently."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_hf_sharded_with_index(tmp_path):
    hf = make_hf_model(tmp_path, shard="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ck = load_checkpoint(tmp_path)
    assert ck.source["kind"] == "hf" and ck.source["fingerprint"].startswith("sha256")
    with torch.no_grad():
        want = hf(IDS).logits
    assert (_logits(ck, IDS) - want).abs().max() < 1e-4


def _meta_state(hf, n_heads, n_kv):
    """HF state dict -> Meta names and interleaved q/k, as torch fp16 tensors."""
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    sub = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
           "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
           "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm"}
    out = {}
    for k, v in hf.state_dict().items():
        w = v.float().numpy()
        if k in names:
            name = names[k]
        else:
            i, rest = k[len("model.layers."):].split(".", 1)
            name = f"layers.{i}.{sub[rest.rsplit('.', 1)[0]]}.weight"
        if name.endswith("wq.weight"):
            w = hf_to_meta_qk(w, n_heads)
        if name.endswith("wk.weight"):
            w = hf_to_meta_qk(w, n_kv)
        out[name] = torch.from_numpy(np.ascontiguousarray(w)).half()
    return out


@pytest.mark.parametrize("n_shards,emb_axis", [(1, 1), (2, 1), (2, 0)])
def test_meta_model_parallel_shards(tmp_path, n_shards, emb_axis):
    """LLaMA-1/2 split the embedding on dim 1 (ParallelEmbedding), LLaMA-3 on dim 0 (vocab-parallel)."""
    hf = make_hf_model(tmp_path / "hf", num_key_value_heads=2)
    full = _meta_state(hf, 4, 2)
    col = ("wq", "wk", "wv", "w1", "w3", "output")  # column-parallel: split dim 0
    row = ("wo", "w2")                                # row-parallel: split dim 1
    col, row = (col + ("tok_embeddings",), row) if emb_axis == 0 else (col, row + ("tok_embeddings",))
    d = tmp_path / "meta"
    d.mkdir()
    for s in range(n_shards):
        shard = {"rope.freqs": torch.ones(8)}  # LLaMA-1 checkpoints carry this buffer
        for name, t in full.items():
            kind = name.split(".")[-2]
            if kind in col:
                t = t.chunk(n_shards, 0)[s]
            elif kind in row:
                t = t.chunk(n_shards, 1)[s]
            shard[name] = t.clone()
        torch.save(shard, d / f"consolidated.{s:02d}.pth")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                               "vocab_size": -1, "multiple_of": 32, "norm_eps": 1e-6,
                                               "ffn_dim_multiplier": 0.565}))
    ck = load_checkpoint(d)
    assert ck.config.ffn_dim == 96 and ck.source["kind"] == "meta"
    for name, t in full.items():
        np.testing.assert_array_equal(ck.weights[name], t.float().numpy(), err_msg=name)
    with torch.no_grad():  # fp16 storage: compare with HF at fp16-rounding tolerance
        want = hf.half().float()(IDS).logits
    assert (_logits(ck, IDS) - want).abs().max() < 1e-3


def test_meta_missing_shard(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    torch.save({"norm.weight": torch.ones(64)}, tmp_path / "consolidated.01.pth")
    with pytest.raises(LlamaExportError, match="shard file is missing"):
        load_checkpoint(tmp_path)


def _write_gguf(path, hf, qtype):
    import gguf
    from gguf.quants import quantize

    cfg = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    sub = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
           "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    expected = {}
    for k, v in hf.state_dict().items():
        a = v.float().numpy()
        parts = k.split(".")
        if parts[1] == "layers":
            name = f"blk.{parts[2]}.{sub['.'.join(parts[3:-1])]}.weight"
        else:
            name = names[parts[-2]] + ".weight"
        if name.endswith("attn_q.weight"):
            a = hf_to_meta_qk(a, cfg.num_attention_heads)
        if name.endswith("attn_k.weight"):
            a = hf_to_meta_qk(a, cfg.num_key_value_heads)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32,):
            q = quantize(a, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            expected[name] = gguf.quants.dequantize(q, qtype)
        else:
            w.add_tensor(name, a)
            expected[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_types(tmp_path, qtype):
    import gguf

    hf = make_hf_model(tmp_path / "hf", hidden_size=64, intermediate_size=128, vocab_size=320)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    expected = _write_gguf(tmp_path / "m.gguf", hf, t)
    ck = load_checkpoint(tmp_path / "m.gguf")
    assert ck.source["kind"] == "gguf" and not ck.config.tie_embeddings
    np.testing.assert_array_equal(ck.weights["layers.1.attention.wk.weight"], expected["blk.1.attn_k.weight"])
    np.testing.assert_array_equal(ck.weights["feed_forward.w2.weight".join(["layers.0.", ""])],
                                  expected["blk.0.ffn_down.weight"])
    if qtype == "F32":
        with torch.no_grad():
            want = hf(IDS).logits
        assert (_logits(ck, IDS) - want).abs().max() < 1e-4


def test_real_smollm2_gguf_config(smollm2_gguf):
    ck = load_checkpoint(smollm2_gguf)
    c = ck.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and abs(c.norm_eps - 1e-5) < 1e-9
    emb = ck.weights["tok_embeddings.weight"]
    assert emb.shape == (49152, 576) and np.isfinite(emb).all() and emb.std() > 0.01


def test_random_weights_are_per_tensor_deterministic():
    a = random_checkpoint(load_checkpoint(size="tiny").config, seed=5).weights
    b = random_checkpoint(load_checkpoint(size="tiny").config, seed=5).weights
    c = random_checkpoint(load_checkpoint(size="tiny").config, seed=6).weights
    np.testing.assert_array_equal(a["layers.1.attention.wq.weight"], b["layers.1.attention.wq.weight"])
    assert not np.array_equal(a["layers.1.attention.wq.weight"], c["layers.1.attention.wq.weight"])


# ------------------------------------------------------------------------------- bad input

def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(LlamaExportError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(LlamaExportError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_hf_model(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LlamaExportError, match="model.safetensors.*corrupt or truncated"):
        load_checkpoint(tmp_path)


def test_truncated_pth(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    torch.save({"norm.weight": torch.ones(64), "x": torch.ones(10000)}, tmp_path / "consolidated.00.pth")
    f = tmp_path / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(LlamaExportError, match="consolidated.00.pth.*corrupt or truncated"):
        load_checkpoint(tmp_path)


def test_corrupt_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(LlamaExportError, match="m.gguf"):
        load_checkpoint(tmp_path / "m.gguf")


def test_hf_missing_tensor_and_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_model(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(LlamaExportError, match="missing 1 tensor.*layers.1.feed_forward.w3.weight"):
        load_checkpoint(tmp_path)

    make_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ck = load_checkpoint(tmp_path)
    with pytest.raises(LlamaExportError, match=r"feed_forward.w1.weight has shape \(96, 64\).*expects \(80, 64\)"):
        ck.weights["layers.0.feed_forward.w1.weight"]


def test_gguf_rope_freqs_give_llama3_scaling(tmp_path):
    """Llama-3.1/3.2 GGUFs carry the llama3 rope scaling as a rope_freqs tensor of divisors."""
    import gguf

    from llamaexport.model.config import LlamaConfig, rope_inv_freq

    rs = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
    hf = make_hf_model(tmp_path / "hf", rope_theta=500000.0, rope_scaling=rs)
    # the tensors as _write_gguf lays them out, then a file that also carries rope_freqs
    expected = _write_gguf(tmp_path / "plain.gguf", hf, gguf.GGMLQuantizationType.F32)
    want_cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96,
                           rope_theta=500000.0, rope_scaling=rs)
    base = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=96, rope_theta=500000.0)
    factors = (rope_inv_freq(base) / rope_inv_freq(want_cfg)).astype(np.float32)
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, 2), (w.add_context_length, 256), (w.add_embedding_length, 64),
                   (w.add_feed_forward_length, 96), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                   (w.add_rope_freq_base, 500000.0), (w.add_layer_norm_rms_eps, 1e-6), (w.add_vocab_size, 300)):
        add(v)
    for name, a in expected.items():
        w.add_tensor(name, a)
    w.add_tensor("rope_freqs.weight", factors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = load_checkpoint(path)
    np.testing.assert_allclose(rope_inv_freq(ck.config), rope_inv_freq(want_cfg), rtol=1e-6)
    with torch.no_grad():
        want = hf(IDS).logits
    assert (_logits(ck, IDS) - want).abs().max() < 1e-4


def test_hf_bf16_safetensors(tmp_path):
    """Real HF checkpoints are mostly bf16: loaded exactly (widened to fp32)."""
    hf = make_hf_model(tmp_path).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ck = load_checkpoint(tmp_path)
    with torch.no_grad():
        want = hf.float()(IDS).logits
    assert (_logits(ck, IDS) - want).abs().max() < 1e-4
