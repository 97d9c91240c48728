"""The eager reference model: HF LlamaForCausalLM parity, functional KV cache, left padding."""

import numpy as np
import pytest
import torch
from conftest import make_hf_model

from llamaexport.model.checkpoint import load_checkpoint
from llamaexport.model.reference import build_reference

HF_VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mha": dict(num_key_value_heads=4),
    "llama3-scaled-tied": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=16)),
    "head-dim-32": dict(num_key_value_heads=2, head_dim=32),
    "linear-scaling": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
}


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_matches_hf_llama(tmp_path, variant):
    hf = make_hf_model(tmp_path, **HF_VARIANTS[variant])
    ck = load_checkpoint(tmp_path)
    ref = build_reference(ck.config, ck.weights)
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got, _ = ref(ids, torch.ones_like(ids), torch.arange(48)[None].expand(2, -1), ref.empty_cache(2))
    assert (got - want).abs().max().item() < 1e-4


def _tiny_ref(seed=0):
    ck = load_checkpoint(size="tiny", seed=seed)
    return build_reference(ck.config, ck.weights)


def test_chunked_prefill_through_cache_equals_full_forward():
    ref = _tiny_ref()
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = ref(ids, torch.ones_like(ids), torch.arange(30)[None], ref.empty_cache(1))
        past, parts = ref.empty_cache(1), []
        for a, b in ((0, 11), (11, 12), (12, 30)):
            out, past = ref(ids[:, a:b], torch.ones(1, b, dtype=torch.long), torch.arange(a, b)[None], past)
            parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_unpadded_result():
    ref = _tiny_ref()
    ids = torch.randint(1, 512, (1, 9), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a, _ = ref(ids, torch.ones_like(ids), torch.arange(9)[None], ref.empty_cache(1))
        b, _ = ref(padded, mask, pos, ref.empty_cache(1))
    torch.testing.assert_close(b[:, 4:], a, atol=1e-5, rtol=1e-5)


def test_strict_weights():
    from llamaexport import LlamaExportError

    ck = load_checkpoint(size="tiny")
    w = dict(ck.weights.items())
    w.pop("layers.1.ffn_norm.weight")
    with pytest.raises(LlamaExportError, match="missing.*layers.1.ffn_norm.weight"):
        build_reference(ck.config, w)
    w = dict(ck.weights.items())
    w["layers.0.attention.wq.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(LlamaExportError, match=r"layers.0.attention.wq.weight: checkpoint shape \(3, 3\)"):
        build_reference(ck.config, w)
