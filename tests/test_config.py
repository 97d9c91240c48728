import json

import numpy as np
import pytest

from llamaexport import LlamaExportError
from llamaexport.model.config import (
    LlamaConfig,
    config_for_size,
    config_from_hf,
    config_from_params_json,
    rope_inv_freq,
    size_names,
)


@pytest.mark.parametrize("size,layers,heads,dim,ffn", [
    ("7B", 32, 32, 4096, 11008), ("13B", 40, 40, 5120, 13824),
    ("33B", 60, 52, 6656, 17920), ("65B", 80, 64, 8192, 22016),
])
def test_llama1_paper_sizes(size, layers, heads, dim, ffn):
    c = config_for_size(size)
    assert (c.n_layers, c.n_heads, c.dim, c.ffn_dim) == (layers, heads, dim, ffn)
    assert c.vocab_size == 32000 and c.norm_eps == 1e-6 and c.n_kv_heads == heads


def test_llama2_and_3_sizes():
    c = config_for_size("llama2-70B")
    assert (c.n_kv_heads, c.ffn_dim, c.n_layers) == (8, 28672, 80)
    c = config_for_size("llama3-8B")
    assert (c.vocab_size, c.ffn_dim, c.rope_theta, c.n_kv_heads) == (128256, 14336, 500000.0, 8)
    c = config_for_size("Llama3.1-8b")  # case-insensitive
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0
    c = config_for_size("llama3.2-1B")
    assert c.tie_embeddings and c.rope_scaling["factor"] == 32.0 and c.head_dim == 64
    assert config_for_size("llama3.2-3B").head_dim == 128
    # 7B in fp16 is 13.5 GB: the parameter count must match the paper's 6.7B
    assert abs(config_for_size("7B").n_params() / 1e9 - 6.74) < 0.01


def test_unknown_size_lists_valid_ones():
    with pytest.raises(LlamaExportError) as e:
        config_for_size("8x7B")
    assert "unknown size '8x7B'" in str(e.value)
    for name in ("7B", "13B", "65B", "llama2-70B", "llama3.2-1B", "tiny"):
        assert name in str(e.value)
    assert len(size_names()) >= 14


def test_params_json(tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
                             "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5,
                             "rope_theta": 500000.0, "use_scaled_rope": True}))
    c = config_from_params_json(p)
    assert c.ffn_dim == 28672 and c.n_kv_heads == 8 and c.rope_scaling["rope_type"] == "llama3"
    p.write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
                             "norm_eps": 1e-6, "vocab_size": -1}))
    c = config_from_params_json(p, vocab_size=32000)
    assert c.ffn_dim == 11008 and c.vocab_size == 32000
    p.write_text("{not json")
    with pytest.raises(LlamaExportError, match="params.json"):
        config_from_params_json(p)


def test_hf_config_variants():
    base = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100, "intermediate_size": 96}
    c = config_from_hf(base)
    assert c.n_kv_heads == 4 and c.head_dim == 16 and not c.tie_embeddings
    c = config_from_hf({**base, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}})
    assert (c.n_kv_heads, c.head_dim, c.tie_embeddings, c.rope_theta) == (2, 32, True, 500000.0)
    assert c.rope_scaling["factor"] == 32.0
    c = config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e6})
    assert c.rope_scaling["rope_type"] == "linear" and c.rope_theta == 1e6
    with pytest.raises(LlamaExportError, match="yarn"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(LlamaExportError, match="not a LLaMA"):
        config_from_hf({**base, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_config_validation_says_how_to_fix():
    with pytest.raises(LlamaExportError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3)
    with pytest.raises(LlamaExportError, match="head_dim"):
        LlamaConfig(dim=65, n_layers=1, n_heads=4)


def test_llama3_rope_matches_transformers():
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = config_for_size("llama3.1-8B")
    hf = HFConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                  rope_scaling=dict(c.rope_scaling), max_position_embeddings=131072)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    np.testing.assert_allclose(rope_inv_freq(c), inv.double().numpy(), rtol=1e-6)


def test_config_is_frozen_and_replace_revalidates():
    import dataclasses

    cfg = config_for_size("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_seq_len = 8
    assert dataclasses.replace(cfg, max_seq_len=8).max_seq_len == 8 and cfg.max_seq_len == 256
    with pytest.raises(LlamaExportError, match="max_seq_len must be a whole number >= 1, got 0"):
        dataclasses.replace(cfg, max_seq_len=0)


def test_whole_number_is_the_one_check_and_message():
    """llamaexport.whole_number: every "whole number >= N" parameter check (config, profiles, plan, sampling,
    generation, engine limits, server fields, eval, bench) raises in one shape naming the parameter."""
    from llamaexport import whole_number

    assert whole_number(3, "x") == 3 and type(whole_number(np.int64(3), "x")) is int
    for value in (0, -1, 2.0, "3", True, None):
        with pytest.raises(LlamaExportError, match=rf"^x must be a whole number >= 1, got {value!r}$".replace("(", r"\(")):
            whole_number(value, "x")
    with pytest.raises(LlamaExportError, match=r"^top_k must be a whole number >= 0 \(0 = off\), got -1$"):
        whole_number(-1, "top_k", at_least=0, note="0 = off")
    with pytest.raises(LlamaExportError, match="^seed must be a whole number from 0 to 9, got 10$"):
        whole_number(10, "seed", at_least=0, at_most=9)
    with pytest.raises(LlamaExportError, match="^seed must be a whole number, got 'a'$"):
        whole_number("a", "seed", at_least=None)
    # a numpy integer in a config is stored as an int (to_dict stays JSON)
    cfg = config_for_size("tiny", max_seq_len=np.int64(64))
    assert type(cfg.max_seq_len) is int and json.dumps(cfg.to_dict())
