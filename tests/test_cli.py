"""The command line's happy path on a tiny model (its bad inputs: test_bad_input.py)."""

import json

from conftest import cli


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
