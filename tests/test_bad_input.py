"""Bad input and hostile conditions, one place: each case runs the command and asserts the exit code,
the one-line message, and what is (not) left on disk. Add a case by adding a test here.

Data loss and overwrites: `--force` replaces only an artifact; one build per --out at a time;
SIGTERM cleans up like Ctrl-C; what a SIGKILLed build left is cleaned up by the next build.

Commands run in this process (conftest.run_cli: click's CliRunner on the same `main` group that turns
errors into one line), except where a real process is the point: the first test (a child's exit status
and stderr, the same as run_cli's), a non-UTF-8 argv, SIGTERM and SIGKILL of a running build, and a
lock held by another process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error, cli, make_hf_model, run_cli


def leftovers(parent: Path, name: str) -> list[str]:
    """The staging files of builds of `parent/name`: partial, old and lock entries."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def start_build(out: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llamaexport.cli", "build", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=120.0):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_force_never_deletes_a_directory_that_is_not_an_artifact(tmp_path):
    """Run by a real process (the console script's module) and in this one (run_cli, which the other
    tests use): the same exit status 1, the same one `error:` line, no traceback, nothing touched."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "important.txt").write_text("keep")
    lines = []
    for run in (cli, run_cli):
        lines.append(assert_clean_error(run("build", "--size", "tiny", "--out", d, "--force"),
                                        "is not a llamaexport artifact", "--force replaces only an artifact"))
        assert (d / "important.txt").read_text() == "keep" and sorted(p.name for p in d.iterdir()) == ["important.txt"]
        assert leftovers(tmp_path, "d") == []
    assert lines[0] == lines[1]


def test_force_never_replaces_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    assert_clean_error(run_cli("build", "--size", "tiny", "--out", f, "--force"), "is not a directory")
    assert f.read_text() == "keep" and leftovers(tmp_path, "notes.txt") == []


def test_out_must_name_a_directory_to_create(tmp_path):
    assert_clean_error(run_cli("build", "--size", "tiny", "--out", "/"), "is not a directory a build can create")
    assert not any(p.name.startswith("..partial") or p.name == "..lock" for p in Path("/").iterdir())


def test_force_replaces_an_artifact(tmp_path):
    out = tmp_path / "a"
    assert run_cli("build", "--size", "tiny", "--out", out).returncode == 0
    first = json.loads((out / "manifest.json").read_text())["built_at"]
    r = run_cli("build", "--size", "tiny", "--seed", "3", "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == {"kind": "random", "seed": 3} and m["built_at"] >= first
    assert leftovers(tmp_path, "a") == []


def test_a_second_build_of_the_same_out_is_refused_naming_the_first(tmp_path):
    """While one build holds --out, another is refused at once with the holder's process id, and the
    holder's work is untouched. The holder is another process (flock is per open file, across processes)."""
    out = tmp_path / "a"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from llamaexport.artifact.staging import target_lock\n"
        f"with target_lock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_clean_error(run_cli("build", "--size", "tiny", "--out", out), f"another build (process {holder.pid})",
                           str(out))
        assert not out.exists() and leftovers(tmp_path, "a") == [".a.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("build", "--size", "tiny", "--out", out).returncode == 0  # the lock went with its process
    assert leftovers(tmp_path, "a") == []


def test_sigterm_removes_the_partial_build(tmp_path):
    out = tmp_path / "a"
    p = start_build(out, "--size", "135M", "--precision", "fp32", "--max-seq-len", "64")
    wait_for(lambda: any(n.startswith(".a.partial-") for n in leftovers(tmp_path, "a")) or p.poll() is not None)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "interrupted (SIGTERM)" in err and "Traceback" not in err, (p.returncode, err)
    assert not out.exists() and leftovers(tmp_path, "a") == []


def test_the_next_build_cleans_up_after_a_killed_one(tmp_path):
    out = tmp_path / "a"
    p = start_build(out, "--size", "135M", "--precision", "fp32", "--max-seq-len", "64")
    wait_for(lambda: any(n.startswith(".a.partial-") for n in leftovers(tmp_path, "a")) or p.poll() is not None)
    assert p.poll() is None, p.communicate()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert f".a.partial-{p.pid}" in leftovers(tmp_path, "a")
    r = run_cli("build", "--size", "tiny", "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"removed {tmp_path / f'.a.partial-{p.pid}'}, left by a build that did not finish" in r.stderr
    assert leftovers(tmp_path, "a") == [] and (out / "manifest.json").is_file()


def test_an_artifact_being_replaced_when_the_build_died_is_restored(tmp_path):
    """What a build killed between moving the old artifact aside and moving the new one in would leave
    (made here by hand: the move now runs with SIGINT/SIGTERM held off, so only SIGKILL can do it): the
    next build puts the old one back, and then refuses to overwrite it without --force."""
    out = tmp_path / "a"
    assert run_cli("build", "--size", "tiny", "--out", out).returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(out, tmp_path / f".a.old-{dead.pid}")
    r = run_cli("build", "--size", "tiny", "--out", out)
    assert_clean_error(r, "already exists")
    assert f"restored {out} from .a.old-{dead.pid}" in r.stderr
    assert (out / "manifest.json").is_file() and leftovers(tmp_path, "a") == []


# ---- inputs covered since the first sessions

def test_build_writes_nothing_half_done(tmp_path):
    """A shape mismatch found mid-export: error, and no output or staging directory left behind."""
    make_hf_model(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    r = run_cli("build", "--checkpoint", tmp_path / "hf", "--tokenizer", tmp_path / "hf", "--out", tmp_path / "out")
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
    (["build", "--size", "tiny", "--chat-format", "mistral", "--out", "{tmp}/o"],
     ["unknown chat format 'mistral'", "koala", "wizardlm", "oasst", "gpt4-x-alpaca"]),
    (["run", "{tmp}/none", "--prompt", "x"], ["not a llamaexport artifact"]),
    (["check", "{tmp}/none"], ["not a llamaexport artifact"]),
])
def test_bad_input_is_one_line(tmp_path, args, fragments):
    r = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_clean_error(r, *fragments)
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint_and_missing_tokenizer(tmp_path):
    make_hf_model(tmp_path / "hf")
    r = run_cli("build", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "o")
    assert_clean_error(r, "no tokenizer found", "--tokenizer")
    f = tmp_path / "hf" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    r = run_cli("build", "--checkpoint", tmp_path / "hf", "--out", tmp_path / "o")
    assert_clean_error(r, "model.safetensors", "corrupt or truncated")
    assert not (tmp_path / "o").exists()


def test_malformed_profile(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('name = "mine"\nbackend = "onnxruntime"\nmemory_gb = -1\n')
    r = run_cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o")
    assert_clean_error(r, "mine.toml", "missing field(s)")
    p.write_text("name = [")
    assert_clean_error(run_cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o"), "not valid TOML")
    cpu = (Path(__file__).parents[1] / "llamaexport/data/profiles/cpu.toml").read_text()
    p.write_text(cpu.replace('precisions = ["fp32", "int8", "int4"]', 'precisions = ["fp32", "w8a8"]'))
    assert_clean_error(run_cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o"), "w8a8", "tensorrt profiles")
    rtx = (Path(__file__).parents[1] / "llamaexport/data/profiles/rtx4090.toml").read_text()
    p.write_text(rtx.replace('precisions = ["fp16", "int8", "w8a8", "int4"]', 'precisions = ["w8a8"]'))
    assert_clean_error(run_cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o"), "besides w8a8")


def test_prompt_longer_than_context_and_existing_out(tiny_artifact, tmp_path):
    r = run_cli("run", tiny_artifact, "--prompt", "hello " * 400)
    assert_clean_error(r, "context is 256", "shorten the prompt")
    r = run_cli("build", "--size", "tiny", "--out", tiny_artifact)
    assert_clean_error(r, "already exists", "--force")



# ---- runtime arguments: one validation (SamplingConfig, runtime.check_generation / check_threads) shared
# by the CLI, the Python API and (later) the server

@pytest.mark.parametrize("args,fragment", [
    (["--threads", "-1"], "threads -1 is not possible here"),
    (["--threads", "100000"], "threads 100000 is not possible here"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
    (["--top-p", "inf"], "top_p must be a finite number"),
    (["--stop", ""], "stop strings must be a list of non-empty strings"),
    (["--max-new-tokens", "-1"], "max_new_tokens must be a whole number >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a whole number >= 1"),
    (["--seed", "-1"], "seed must be a whole number from 0"),
])
def test_bad_runtime_arguments_are_one_line(tiny_artifact, args, fragment):
    assert_clean_error(run_cli("run", tiny_artifact, "--prompt", "hello", *args), fragment)


def test_a_prompt_that_is_not_utf8_is_one_line(tiny_artifact):
    """A real process: the bytes of its argv are decoded by the interpreter, not by the test."""
    r = subprocess.run([sys.executable, "-m", "llamaexport.cli", "run", str(tiny_artifact), "--prompt", b"caf\xe9"],
                       capture_output=True, text=True, timeout=300)
    assert_clean_error(r, "the prompt is not valid UTF-8")


def test_the_python_api_validates_the_same_way(tiny_artifact):
    from llamaexport import LlamaExportError
    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.runtime.sampling import SamplingConfig

    for bad, message in ((dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
                         (dict(seed=-1), "seed must be a whole number from 0"),
                         (dict(top_k=1.5), "top_k must be a whole number >= 0"),
                         (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number, got inf")):
        with pytest.raises(LlamaExportError, match=message):
            SamplingConfig(**bad)
    with LlamaModel.load(tiny_artifact) as m:
        with pytest.raises(LlamaExportError, match="max_new_tokens"):
            m.generate("hello", max_new_tokens=0)
        with pytest.raises(LlamaExportError, match="stop strings"):
            m.generate("hello", stop=[""])
        with pytest.raises(LlamaExportError, match="max_new_tokens"):
            m.generate_ids([[1, 2]], max_new_tokens=-1)
    with pytest.raises(LlamaExportError, match="threads 0.5"):
        LlamaModel.load(tiny_artifact, threads=0.5)


# ---- integrity: the build records every file's sha256; verify and check compare them, run checks sizes

def test_flipped_bytes_are_named_by_verify_and_check(tmp_path):
    out = tmp_path / "a"
    assert run_cli("build", "--size", "tiny", "--out", out).returncode == 0
    m = json.loads((out / "manifest.json").read_text())
    assert {"model.onnx", "model.onnx.data"} <= set(m["checksums"])
    r = run_cli("verify", out)
    assert r.returncode == 0 and "files match" in r.stdout, r.stderr
    data = out / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    r = run_cli("verify", out)
    assert_clean_error(r, "model.onnx.data changed since the build")
    assert "DAMAGED  model.onnx.data" in r.stdout
    assert_clean_error(run_cli("check", out), "is damaged: model.onnx.data changed since the build")
    assert not (out / "parity.json").exists()


def test_a_truncated_weight_file_stops_run(tmp_path):
    out = tmp_path / "a"
    assert run_cli("build", "--size", "tiny", "--out", out).returncode == 0
    data = out / "model.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 4096)
    assert_clean_error(run_cli("run", out, "--prompt", "x"), f"model.onnx.data is {size - 4096} bytes, the build wrote {size}")


def test_nan_metrics_fail_the_check():
    from llamaexport.verify.parity import _failures, thresholds

    report = {"max_abs_logit": float("nan"), "mean_abs_logit": 0.1, "mean_kl": 1e-3, "max_kl": 1e-2,
              "top1_agreement": 0.99, "greedy_agreement": 1.0, "ppl_artifact": 10.0, "ppl_delta_rel": 0.0}
    assert _failures(report, thresholds("int8")) == ["max_abs_logit is nan"]  # int8 does not gate max |dlogit|
    report.update(max_abs_logit=0.5, mean_kl=float("nan"))
    assert "mean_kl is nan" in _failures(report, thresholds("int8"))


# ---- checkpoint configs and profiles: validated when read, one line naming the field, value and file

@pytest.mark.parametrize("change,fragments", [
    ({"num_attention_heads": 0}, ["n_heads must be a whole number >= 1, got 0"]),
    ({"hidden_size": "64"}, ["dim must be a whole number >= 1, got '64'"]),
    ({"hidden_size": None}, ["dim must be a whole number >= 1, got None"]),
    ({"num_attention_heads": 6, "head_dim": None}, ["dim 64 is not divisible by n_heads 6"]),
    ({"rms_norm_eps": float("nan")}, ["norm_eps must be a finite number > 0, got nan"]),
    ({"rope_theta": "big"}, ["rope_theta must be a finite number > 0"]),
    ("delete:hidden_size", ["config.json lacks hidden_size"]),
    ("not-an-object", ["config.json must be a JSON object, got list"]),
])
def test_bad_hf_configs_are_one_line_naming_the_file(tmp_path, change, fragments):

    make_hf_model(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    c = json.loads(path.read_text())
    if change == "not-an-object":
        c = [c]
    elif isinstance(change, str):
        del c[change.split(":")[1]]
    else:
        c.update(change)
    path.write_text(json.dumps(c))  # NaN as JSON's NaN, which Python's json reads back as nan
    line = assert_clean_error(run_cli("build", "--checkpoint", tmp_path / "hf", "--tokenizer", tmp_path / "none",
                                  "--out", tmp_path / "o"), *fragments)
    assert str(path) in line  # the file is named
    assert not (tmp_path / "o").exists() and leftovers(tmp_path, "o") == []


def test_max_seq_len_and_batch_must_be_positive(tmp_path):
    assert_clean_error(run_cli("build", "--size", "tiny", "--max-seq-len", "-5", "--out", tmp_path / "o"),
                       "max_seq_len must be a whole number >= 1, got -5")
    assert not (tmp_path / "o").exists()
    assert_clean_error(run_cli("plan", "--size", "7B", "--batch", "-3"), "batch must be a whole number >= 1, got -3")
    assert_clean_error(run_cli("plan", "--size", "7B", "--max-seq-len", "0"), "must be a whole number >= 1, got 0")


@pytest.mark.parametrize("line,fragment", [
    ("memory_gb = nan", "memory_gb must be a positive number, got nan"),
    ("memory_gb = inf", "memory_gb must be a positive number, got inf"),
    ("memory_gb = true", "memory_gb must be a positive number, got True"),
    ("reserved_gb = -1.0", "reserved_gb must be a number from 0 to memory_gb"),
    ("default_context = 2048.5", "default_context must be a whole number >= 1, got 2048.5"),
    ("shared_memory = 1", "shared_memory must be true or false"),
])
def test_bad_profile_values_are_one_line(tmp_path, line, fragment):
    import re

    cpu = (Path(__file__).parents[1] / "llamaexport/data/profiles/cpu.toml").read_text()
    key = line.split(" = ")[0]
    p = tmp_path / "mine.toml"
    p.write_text(re.sub(rf"(?m)^{key} = .*$", line, cpu))
    assert_clean_error(run_cli("build", "--size", "tiny", "--profile", p, "--out", tmp_path / "o"), "mine.toml", fragment)


def test_a_pickle_that_holds_code_is_named_as_such(tmp_path):
    """weights_only loading refuses a checkpoint that carries objects besides tensors: the message says so
    (not "corrupt or truncated") and how to convert it."""
    import pickle

    import torch

    d = tmp_path / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512}))

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"x": torch.zeros(2), "payload": Payload()}, d / "consolidated.00.pth", pickle_module=pickle)
    r = run_cli("build", "--checkpoint", d, "--tokenizer", tmp_path / "none", "--out", tmp_path / "o")
    assert_clean_error(r, "consolidated.00.pth holds Python objects or code besides tensors", "safetensors")
    assert "this would run" not in r.stdout + r.stderr


def test_a_gguf_without_head_count_is_one_line(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_feed_forward_length(160)
    w.add_tensor("token_embd.weight", np.zeros((512, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_clean_error(run_cli("build", "--checkpoint", path, "--out", tmp_path / "o"),
                       "m.gguf", "lacks llama.attention.head_count")
    assert not (tmp_path / "o").exists()


# ---- manifests: one schema on load, messages naming the key; file references stay inside

@pytest.mark.parametrize("tamper,fragment", [
    (lambda m: [m], "the manifest must be a JSON object, got list"),
    (lambda m: {k: v for k, v in m.items() if k != "io"}, "key 'io' is missing"),
    (lambda m: {k: v for k, v in m.items() if k != "kv_cache"}, "key 'kv_cache' is missing"),
    (lambda m: {**m, "files": "model.onnx"}, "key 'files' must be an object, got str"),
    (lambda m: {**m, "schema_version": "1"}, "schema_version is '1', this llamaexport reads the number 1"),
    (lambda m: {**m, "source": {"kind": "random", "seed": "7"}}, "key source.seed must be a whole number"),
    (lambda m: {**m, "model": {**m["model"], "n_heads": 0}}, "key model: config field n_heads must be"),
    (lambda m: {**m, "files": {**m["files"], "onnx": "../../../../etc/passwd"}}, "outside the artifact directory"),
    (lambda m: {**m, "files": {**m["files"], "onnx": "/etc/passwd"}}, "outside the artifact directory"),
    (lambda m: {**m, "chat_format": "mistral"}, "key 'chat_format' is 'mistral', not one of auto, template"),
    (lambda m: {**m, "chat_format": 3}, "key 'chat_format' must be a string or null, got int"),
])
def test_bad_manifests_are_one_line_naming_the_key(tiny_artifact, tmp_path, tamper, fragment):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(tamper(m)))
    for args in (["run", art, "--prompt", "x"], ["inspect", art], ["verify", art]):
        assert_clean_error(run_cli(*args), "manifest.json", fragment)


def test_a_safetensors_index_pointing_outside_is_refused(tmp_path):

    make_hf_model(tmp_path / "hf", shard="20KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "hf" / data["weight_map"][name]).read_bytes())
    data["weight_map"][name] = "../outside.safetensors"
    index.write_text(json.dumps(data))
    assert_clean_error(run_cli("build", "--checkpoint", tmp_path / "hf", "--tokenizer", tmp_path / "none",
                           "--out", tmp_path / "o"), "'../outside.safetensors', outside")


def test_an_absurd_context_is_out_of_memory_not_a_traceback(tmp_path):
    r = run_cli("build", "--size", "tiny", "--max-seq-len", "4000000000", "--memory-gb", "1e15", "--out", tmp_path / "o")
    assert_clean_error(r, "out of memory", "--max-seq-len")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path, "o") == []


def test_symlinked_files_are_still_inside(tmp_path):
    """The Hugging Face cache keeps a snapshot's files as symlinks into ../../blobs: they are the
    checkpoint's own files, and so are an artifact's symlinked files."""
    from llamaexport.artifact.manifest import inside
    from llamaexport.model.checkpoint import _safetensors_files

    make_hf_model(tmp_path / "src", shard="20KB")
    snap, blobs = tmp_path / "cache" / "snapshots" / "rev", tmp_path / "cache" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (tmp_path / "src").iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    assert len(_safetensors_files(snap)) > 1
    assert inside(snap, "model.safetensors") and inside(snap, "a/../b") and not inside(snap, "a/../../b")
    r = run_cli("build", "--checkpoint", snap, "--tokenizer", tmp_path / "none", "--out", tmp_path / "o")
    assert "outside" not in r.stderr  # (it stops later, at the missing tokenizer)


def test_a_bad_checksum_entry_is_one_line(tiny_artifact, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["checksums"]["model.onnx"] = "abc"
    (art / "manifest.json").write_text(json.dumps(m))
    for args in (["run", art, "--prompt", "x"], ["verify", art]):
        assert_clean_error(run_cli(*args), "checksums.model.onnx must be an object with bytes and sha256")


def test_recorded_threads_fit_the_machine_that_runs_the_artifact(tiny_artifact, tmp_path):
    """A profile's threads recorded at build is capped at the CPUs of the machine that loads it."""
    import shutil

    from llamaexport.runtime.llama_model import LlamaModel, default_threads

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["runtime"] = {"threads": 4096}
    (art / "manifest.json").write_text(json.dumps(m))
    with LlamaModel.load(art) as model:
        assert model.backend.threads == default_threads()
