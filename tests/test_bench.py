"""`llamaexport bench`'s memory report (weights, KV cache, RSS budget) and scripts/bench_peers.py's
weight-bytes-read-per-token accounting (ONNX, GGUF, safetensors)."""

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamaexport.verify.bench import RSS_OVERHEAD_MB, kv_cache_bytes

MiB = 2**20


def bench_cli(*args):
    r = subprocess.run([sys.executable, "-m", "llamaexport.cli", "bench", *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_bench_json_memory_budget(tiny_artifact):
    out = bench_cli(tiny_artifact, "--prompt-len", "16", "--new-tokens", "8", "--repeat", "1", "--threads", "1",
                    "--json")
    b = json.loads(out)
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    c = m["model"]
    assert {"prefill_tok_s", "decode_tok_s", "peak_rss_mb", "prompt_len", "new_tokens", "threads"} <= set(b)
    assert b["prompt_len"] == 16 and b["new_tokens"] == 8 and b["threads"] == 1 and b["decode_tok_s"] > 0
    on_disk = (tiny_artifact / "model.onnx").stat().st_size + (tiny_artifact / "model.onnx.data").stat().st_size
    assert b["weights_mb"] == round(on_disk / MiB, 3)
    # the CPU graph uses GroupQueryAttention: the runtime binds max_seq_len-long K and V buffers per layer
    assert m["kv_cache"] == {"form": "past_present_shared", "dtype": "float32"}
    kv = 2 * c["n_layers"] * c["n_kv_heads"] * c["head_dim"] * c["max_seq_len"] * 1 * 4
    assert kv == 2 * 2 * 2 * 16 * 256 * 4  # tiny: 0.125 MiB
    assert b["kv_cache_mb"] == round(kv / MiB, 3)
    assert b["rss_budget_mb"] == pytest.approx(b["weights_mb"] + b["kv_cache_mb"] + RSS_OVERHEAD_MB, abs=2e-3)
    assert b["rss_within_budget"] is (b["peak_rss_mb"] <= b["rss_budget_mb"])

    text = bench_cli(tiny_artifact, "--prompt-len", "16", "--new-tokens", "8", "--repeat", "1", "--threads", "1")
    line = next(ln for ln in text.splitlines() if "peak RSS" in ln)
    assert f"weights {b['weights_mb']:.1f}" in line and f"KV cache {b['kv_cache_mb']:.1f}" in line
    assert "budget" in line and ("within" if b["rss_within_budget"] else "OVER") in line


def test_kv_cache_bytes_by_form(tiny_artifact):
    m = json.loads((tiny_artifact / "manifest.json").read_text())
    L, kvh, hd, ctx = (m["model"][k] for k in ("n_layers", "n_kv_heads", "head_dim", "max_seq_len"))
    shared = kv_cache_bytes(m, batch=2, prompt_len=16, new_tokens=8)
    assert shared == 2 * L * kvh * hd * ctx * 2 * 4  # independent of the run's length
    grown = dict(m, kv_cache={"form": "past_present", "dtype": "float16"})
    assert kv_cache_bytes(grown, batch=2, prompt_len=16, new_tokens=8) == 2 * L * kvh * hd * (16 + 8) * 2 * 2


# ---- scripts/bench_peers.py ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peers():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_peers.py"
    spec = importlib.util.spec_from_file_location("bench_peers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_memory_and_port_helpers_of_the_benchmarks():
    """peak_rss_mb / rss_mb / free_port: the one copy that bench, scripts/bench_serve.py, scripts/soak_serve.py
    and test_serve.py use. Another process's figures come from /proc; this one's peak from getrusage."""
    import os
    import socket

    from llamaexport.verify.bench import free_port, peak_rss_mb, rss_mb

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        now, peak = rss_mb(child.pid), peak_rss_mb(child.pid)
        assert 0 < now <= peak
    finally:
        child.communicate(b"")
    assert 0 < rss_mb(os.getpid()) <= peak_rss_mb(os.getpid())
    assert abs(peak_rss_mb() - peak_rss_mb(os.getpid())) < 0.05 * peak_rss_mb()  # two views of one peak
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))  # free: binds


def test_onnx_bytes_per_token_of_our_artifact(peers, tiny_artifact):
    import onnx
    from onnx import numpy_helper

    path = tiny_artifact / "model.onnx"
    sizes = {t.name: numpy_helper.to_array(t, base_dir=str(tiny_artifact)).nbytes
             for t in onnx.load(str(path)).graph.initializer}
    rows = {"model.embed_tokens.weight": 512, "model.rotary.cos_cache": 256, "model.rotary.sin_cache": 256}
    assert rows.keys() <= sizes.keys()
    # everything once, except one row each of the gathered embedding and of GroupQueryAttention's cos/sin caches
    expected = sum(sizes.values()) - sum(sizes[n] - sizes[n] // r for n, r in rows.items())
    assert peers.onnx_bytes_per_token(path) == expected
    assert expected == sum(sizes.values()) - (512 - 1) * 64 * 4 - 2 * (256 - 1) * 8 * 4


def test_onnx_bytes_per_token_tied_embedding(peers, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    E = numpy_helper.from_array(np.zeros((10, 4), np.float32), "E")  # Gather + Gemm (tied lm_head): full
    G = numpy_helper.from_array(np.zeros((10, 4), np.float32), "G")  # Gather only: one row
    U = numpy_helper.from_array(np.zeros((100,), np.float32), "U")  # unused: nothing
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"]), helper.make_node("Gather", ["G", "ids"], ["y"]),
             helper.make_node("Add", ["x", "y"], ["h"]),
             helper.make_node("Gemm", ["h", "E"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [E, G, U])
    onnx.save(helper.make_model(g), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    assert peers.onnx_bytes_per_token(tmp_path / "m.onnx") == 10 * 4 * 4 + 4 * 4


def test_gguf_bytes_per_token(peers, tmp_path):
    gguf = pytest.importorskip("gguf")

    def write(path, tied):
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))  # 32 rows of 8
        if not tied:
            w.add_tensor("output.weight", np.zeros((32, 8), np.float32))
        w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    assert peers.gguf_bytes_per_token(write(tmp_path / "a.gguf", tied=False)) == (32 * 8 + 8 * 8 + 8) * 4
    assert peers.gguf_bytes_per_token(write(tmp_path / "b.gguf", tied=True)) == (32 * 8 + 8 * 8) * 4


def test_safetensors_bytes_per_token(peers, tmp_path):
    def write(path, tensors):
        header, off = {}, 0
        for name, shape in tensors.items():
            n = int(np.prod(shape)) * 4
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        h = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(h)) + h + bytes(off))

    d = tmp_path / "untied"
    d.mkdir()
    write(d / "model.safetensors", {"model.embed_tokens.weight": (32, 8), "lm_head.weight": (32, 8),
                                    "model.layers.0.self_attn.q_proj.weight": (8, 8)})
    assert peers.safetensors_bytes_per_token(d) == (8 + 32 * 8 + 8 * 8) * 4
    t = tmp_path / "tied"
    t.mkdir()
    write(t / "model.safetensors", {"model.embed_tokens.weight": (32, 8),
                                    "model.layers.0.self_attn.q_proj.weight": (8, 8)})
    assert peers.safetensors_bytes_per_token(t) == (32 * 8 + 8 * 8) * 4


def test_huge_page_env_only_where_it_changes_something():
    from llamaexport.runtime.hugepages import REEXEC_MARK, TUNABLE, huge_page_env
    linux = dict(system="Linux", libc=("glibc", "2.36"), thp_mode="madvise")
    env = huge_page_env({"A": "1"}, **linux)
    assert env == {"A": "1", "GLIBC_TUNABLES": f"{TUNABLE}=1", REEXEC_MARK: "1"}
    # the re-exec'd process never re-execs again, even where glibc dropped the tunable (secure mode)
    assert huge_page_env({k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}, **linux) is None
    # the user's own tunables are kept; set already (by the user or our re-exec): nothing to do
    assert huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **linux)["GLIBC_TUNABLES"] == \
        f"glibc.malloc.arena_max=2:{TUNABLE}=1"
    assert huge_page_env({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, **linux) is None
    assert huge_page_env({"LLAMAEXPORT_HUGE_PAGES": "0"}, **linux) is None
    for other in (dict(system="Darwin"), dict(libc=("glibc", "2.31")), dict(libc=("musl", "1.2")),
                  dict(libc=("", "")), dict(thp_mode="always"), dict(thp_mode="never")):
        assert huge_page_env({}, **{**linux, **other}) is None, other


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    from llamaexport.runtime.hugepages import _thp_mode
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert _thp_mode(str(f)) == "madvise"
    assert _thp_mode(str(tmp_path / "missing")) is None


def test_bench_runs_with_huge_pages_where_the_system_offers_them(tiny_artifact):
    """The model-running commands re-exec with glibc's hugetlb tunable: the weights land in huge pages
    (bench reports how many MB); LLAMAEXPORT_HUGE_PAGES=0 turns it off."""
    import os

    from llamaexport.runtime.hugepages import huge_page_env
    if huge_page_env(dict(os.environ)) is None:
        pytest.skip("no transparent huge pages to ask for here (not Linux/glibc >= 2.35 in THP madvise mode, "
                    "or GLIBC_TUNABLES already names the tunable)")
    args = [tiny_artifact, "--prompt-len", "8", "--new-tokens", "4", "--repeat", "1", "--json"]
    assert json.loads(bench_cli(*args))["huge_pages_mb"] > 0
    r = subprocess.run([sys.executable, "-m", "llamaexport.cli", "bench", *map(str, args)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "LLAMAEXPORT_HUGE_PAGES": "0"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["huge_pages_mb"] == 0
