"""The command line: the happy path on a tiny model, and one clear line for every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_hf_model


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llamaexport.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def assert_clean_error(r, *fragments):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def test_happy_path(tiny_artifact, tmp_path):
    r = cli("run", tiny_artifact, "--prompt", "hello world", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    r = cli("check", tiny_artifact, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["greedy_identical"] and report["max_abs_logit"] < 1e-3
    assert json.loads((tiny_artifact / "parity.json").read_text())["passed"]
    assert json.loads((tiny_artifact / "manifest.json").read_text())["parity"]["passed"]
    r = cli("bench", tiny_artifact, "--prompt-len", "16", "--new-tokens", "8", "--repeat", "1", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert {"prefill_tok_s", "decode_tok_s", "peak_rss_mb", "prompt_len", "new_tokens", "threads"} <= set(b)
    assert b["decode_tok_s"] > 0 and b["threads"] == 1 and b["prompt_len"] == 16
    r = cli("inspect", tiny_artifact)
    assert r.returncode == 0 and "PASS" in r.stdout and "2 layers, dim 64" in r.stdout
    r = cli("profiles")
    assert r.returncode == 0 and "rtx4090" in r.stdout and "jetson-orin-nano-8gb" in r.stdout


def test_build_writes_nothing_half_done(tmp_path):
    """A shape mismatch found mid-export: error, and no output or staging directory left behind."""
    make_hf_model(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    r = cli("build", "--checkpoint", tmp_path / "hf", "--tokenizer", tmp_path / "hf", "--out", tmp_path / "out")
    assert r.returncode == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("args,fragments", [
    (["build", "--size", "8x7B", "--out", "{tmp}/o"], ["unknown size '8x7B'", "7B", "llama3-8B"]),
    (["build", "--size", "tiny", "--profile", "nope", "--out", "{tmp}/o"], ["unknown profile 'nope'", "rtx4090"]),
    (["build", "--checkpoint", "{tmp}/missing", "--out", "{tmp}/o"], ["does not exist"]),
    (["build", "--size", "tiny", "--checkpoint", "{tmp}", "--out", "{tmp}/o"], ["exactly one of"]),
    (["build", "--size", "tiny", "--profile", "rtx4090", "--out", "{tmp}/o"], ["needs TensorRT", "--export-only"]),
    (["build", "--size", "tiny", "--profile", "cpu", "--precision", "fp16", "--out", "{tmp}/o"],
     ["fp16 is not supported by profile cpu"]),
    (["build", "--size", "tiny", "--precision", "int8", "--block-size", "48", "--out", "{tmp}/o"],
     ["--block-size 48 is not supported", "16, 32, 64, 128 or 256"]),
    (["run", "{tmp}/none", "--prompt", "x"], ["not a llamaexport artifact"]),
    (["check", "{tmp}/none"], ["not a llamaexport artifact"]),
])
def test_bad_input_is_one_line(tmp_path, args, fragments):
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_clean_error(r, *fragments)
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint_and_missing_tokenizer(tmp_path):
    make_hf_model(tmp_path / "hf")
    r = cli("build", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "o")
    assert_clean_error(r, "no tokenizer found", "--tokenizer")
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    r = cli("build", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "o")
    assert_clean_error(r, "model.safetensors", "corrupt or truncated")
    assert not (tmp_path / "o").exists()


def test_malformed_profile(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('name = "mine"\nbackend = "onnxruntime"\nmemory_gb = -1\n')
    r = cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o")
    assert_clean_error(r, "mine.toml", "missing field(s)")
    p.write_text("name = [")
    assert_clean_error(cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o"), "not valid TOML")
    cpu = (Path(__file__).parents[1] / "llamaexport/profiles/cpu.toml").read_text()
    p.write_text(cpu.replace('precisions = ["fp32", "int8", "int4"]', 'precisions = ["fp32", "w8a8"]'))
    assert_clean_error(cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o"), "w8a8", "tensorrt profiles")
    rtx = (Path(__file__).parents[1] / "llamaexport/profiles/rtx4090.toml").read_text()
    p.write_text(rtx.replace('precisions = ["fp16", "int8", "w8a8", "int4"]', 'precisions = ["w8a8"]'))
    assert_clean_error(cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o"), "besides w8a8")


def test_prompt_longer_than_context_and_existing_out(tiny_artifact, tmp_path):
    r = cli("run", tiny_artifact, "--prompt", "hello " * 400)
    assert_clean_error(r, "context is 256", "shorten the prompt")
    r = cli("build", "--size", "tiny", "--out", tiny_artifact)
    assert_clean_error(r, "already exists", "--force")
