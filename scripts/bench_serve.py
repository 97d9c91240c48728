#!/usr/bin/env python
"""Serving benchmark: `llamaexport serve` ("ours") vs onnxruntime-genai 0.18's Engine (served by
scripts/genai_server.py; on the CPU its Engine batches statically: up to 4 requests that arrive together
decode as one batch and later ones wait for the whole batch, since its dynamic batching needs paged attention,
which is CUDA/WebGPU only; the server waits 10 ms for arrivals to join a batch) vs llama.cpp's server
(`python -m llama_cpp.server`, llama-cpp-python), each a server process on 127.0.0.1
driven by N concurrent streaming clients. llama-cpp-python's server runs one request at a time (its default
cancels the running stream when another arrives: --interrupt_requests False makes the others wait).

    python scripts/bench_serve.py [--models smollm2:int8,1.1b-bpe:int4] [--systems ours,genai,llamacpp]
                                  [--concurrency 1,2,4,8] [--prompt-len 64] [--new-tokens 128] [--threads 2]
                                  [--max-batch 8] [--workdir DIR] [--json OUT]

Weights: each system's own build of the same checkpoint, made by scripts/bench_peers.py's preparation (ours:
`llamaexport build --precision P`; genai: its model builder, MatMulNBits RTN blocks of 32; llama.cpp: its own
quantizer, int8 = Q8_0, int4 = Q4_0). smollm2 is the demo GGUF dequantized; 1.1b-bpe is the TinyLlama-1.1B
shape with random weights and SmolLM2's tokenizer (so its vocabulary is 49152, not 32000: llama.cpp must
tokenize the text prompts), written once as an HF checkpoint that all three build from (same weights).
Requests: POST /v1/completions, stream, greedy (temperature 0), `ignore_eos` and `min_tokens` so every
request generates exactly --new-tokens tokens. Each request has its own prompt (--prompt-len tokens of our
tokenizer, decoded to text; no two requests share a prefix, so no server's prompt cache helps). For each N
the clients start together. Interleaved: every system's server is up at once and warmed up; for each N,
--rounds rounds (default 3) each run every system once, in turn, the order rotating; a figure is the median
over the rounds (peak RSS: the largest).
Figures per (system, N): aggregate generated tok/s = N * new tokens / (last stream's end - first send);
decode tok/s = N * (new tokens - 1) / (last stream's end - the first streamed token of any stream), i.e.
without the first prefill (x N=1 is its ratio to N = 1);
TTFT = send to the first streamed token; ITL = gaps between a stream's streamed chunks (one chunk per token
with text, so a token whose text is held back merges into the next gap); p50/p99 over all requests/gaps of
the round; peak RSS = the server process's VmHWM after the round (peak since it started).
Memory budget (ours): weights (the artifact's ONNX files) + N sequences' KV for prompt + new tokens + 400 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from llamaexport.verify.bench import free_port, peak_rss_mb

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_peers as bp  # noqa: E402 - model preparation shared with the single-stream benchmark

LLAMACPP_SERVER_PIP = ["llama-cpp-python[server]", "gguf", "safetensors", "numpy"]


def log(msg):
    print(f"[bench-serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the three servers ---------------------------------------------------------------------------------

def _genai_python(wd: Path) -> str:
    """This Python when it has onnxruntime-genai, its builder's imports (torch, onnx_ir) and the server's
    (starlette): the test extra installs genai 0.18 here; else bench_peers' genai venv."""
    probe = "import onnxruntime_genai, onnx_ir, torch, starlette, uvicorn, sse_starlette"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        return sys.executable
    py = _ensure_genai_venv(wd)
    if subprocess.run([py, "-c", probe], capture_output=True).returncode != 0:
        bp.sh([py, "-m", "pip", "install", "torch==2.13.0", "starlette", "uvicorn", "sse-starlette"],
              wd / "logs" / "genai-serve-pip.log", "pip install the genai server's packages")
    return py


_ensure_genai_venv, bp.ensure_genai_venv = bp.ensure_genai_venv, _genai_python


def ensure_llamacpp_server(wd: Path) -> str:
    """A Python with llama-cpp-python's server extra (compiled from source on first use: minutes)."""
    venv = wd / "llamacpp-server-venv"
    py = str(venv / "bin" / "python")
    probe = "import llama_cpp.server.app, gguf, safetensors, uvicorn"
    for python in (sys.executable, py):
        if Path(python).exists() and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
            return python
    log(f"llamacpp: creating {venv} and building {' '.join(LLAMACPP_SERVER_PIP)} (minutes)")
    bp.sh([sys.executable, "-m", "venv", str(venv)], wd / "logs" / "llamacpp-server-venv.log", "venv")
    bp.sh([py, "-m", "pip", "install", *LLAMACPP_SERVER_PIP], wd / "logs" / "llamacpp-server-pip.log",
          "pip install llama-cpp-python[server]")
    return py


def server_command(system: str, model: str, precision: str, a, wd: Path, port: int) -> tuple[list[str], dict]:
    """(argv, facts) of one system's server for (model, precision)."""
    knobs = argparse.Namespace(threads=a.threads, prompt_len=a.prompt_len, new_tokens=a.new_tokens, repeat=1)
    if system == "ours":
        d = prepare_ours(model, precision, wd)
        m = json.loads((d / "manifest.json").read_text())
        weights = sum((d / m["files"][k]).stat().st_size for k in ("onnx", "onnx_data") if m["files"].get(k))
        return ([sys.executable, "-m", "llamaexport.cli", "serve", str(d), "--port", str(port), "--threads",
                 str(a.threads), "--max-batch", str(a.max_batch), "--max-queue", "64"],
                dict(dir=str(d), weights_mb=weights / 2**20, kv_bytes_per_token=kv_bytes_per_token(m)))
    if system == "genai":
        job = bp.prepare_genai(model, precision, knobs, wd)
        return ([job["python"], str(HERE / "genai_server.py"), job["args"]["dir"], "--port", str(port),
                 "--threads", str(a.threads), "--max-batch", str(a.max_batch)], dict(dir=job["args"]["dir"]))
    if system == "llamacpp":
        py = ensure_llamacpp_server(wd)
        path = bp.ensure_gguf(model, bp.GGUF_TYPES[precision], py, wd)
        return ([py, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port), "--host", "127.0.0.1",
                 "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads), "--n_ctx", "2048",
                 "--verbose", "False", "--interrupt_requests", "False"], dict(gguf=str(path)))
    raise SystemExit(f"unknown system {system}")


def prepare_ours(model: str, precision: str, wd: Path) -> Path:
    """Our artifact, built from the checkpoint the peers build from (the 1.1b: the HF dir, whose dummy
    tokenizer the server needs; bench_peers builds it from --size, without one)."""
    out = wd / f"serve-ours-{model}-{precision}"
    if bp._stale(out, precision, "accurate"):
        src = bp.smollm2_gguf() if "gguf" in bp.MODELS[model] else bp.ensure_hf_dir(model, wd)
        log(f"ours: llamaexport build {src} --precision {precision} -> {out}")
        # random weights (the 1.1b shapes): calibration would measure nothing, so round-to-nearest as genai does
        method = [] if "gguf" in bp.MODELS[model] else ["--quant-method", "rtn"]
        bp.sh([sys.executable, "-m", "llamaexport.cli", "build", "--checkpoint", str(src), "--profile", "cpu",
               "--precision", precision, "--out", str(out), "--force", *method],
              wd / "logs" / f"serve-ours-build-{model}-{precision}.log", "llamaexport build")
    return out


def kv_bytes_per_token(manifest: dict) -> int:
    m = manifest["model"]
    item = 2 if manifest["kv_cache"].get("dtype") == "float16" else 4
    return 2 * m["n_layers"] * m["n_kv_heads"] * m["head_dim"] * item


def start(argv, logfile: Path, url: str, timeout=600) -> subprocess.Popen:
    import httpx

    logfile.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(argv, stdout=open(logfile, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {logfile}")
        for path in ("/health", "/v1/models"):
            try:
                if httpx.get(url + path, timeout=2).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not come up in {timeout}s; see {logfile}")


def stop(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- the clients ---------------------------------------------------------------------------------------

def make_prompts(artifact: Path, n: int, length: int, seed: int) -> list[str]:
    """n prompt texts of about `length` tokens each: random plain words of the model's vocabulary,
    cut to `length` tokens by our tokenizer."""
    import numpy as np

    from llamaexport.model.tokenizer import load_tokenizer

    tok = load_tokenizer(artifact)
    rng = np.random.default_rng(seed)
    words = [w for w in (tok.decode([i]).strip() for i in range(3, min(tok.vocab_size, 20000)))
             if w.isascii() and w.isalnum() and len(w) > 1]
    out = []
    for _ in range(n):
        ids = tok.encode(" ".join(rng.choice(words, size=length * 2)), add_bos=False)[:length]
        out.append(tok.decode(ids))
    return out


async def one_stream(client, url: str, prompt: str, new_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps, chunks = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices") and d["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                chunks += 1
    return {"t0": t0, "stamps": stamps, "end": time.perf_counter()}


async def round_(url: str, prompts: list[str], new_tokens: int) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        return await asyncio.gather(*(one_stream(client, url, p, new_tokens) for p in prompts))


def pct(xs, q):
    import numpy as np
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(results: list[dict], new_tokens: int) -> dict:
    t0 = min(r["t0"] for r in results)
    end = max(r["end"] for r in results)
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    first = min(r["stamps"][0] for r in results if r["stamps"])
    return {"tok_s": len(results) * new_tokens / (end - t0),
            "decode_tok_s": len(results) * (new_tokens - 1) / (end - first), "ttft_p50_ms": pct(ttft, 50) * 1e3,
            "ttft_p99_ms": pct(ttft, 99) * 1e3, "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
            "wall_s": end - t0}


# ---- main ----------------------------------------------------------------------------------------------

def table(rows) -> str:
    head = ["model", "system", "N", "tok/s", "decode tok/s", "x N=1", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
            "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['system']} | {r.get('N', '')} | n/a ({r['error'][:60]}) |" + " |" * 7)
            continue
        lines.append(f"| {r['model']} | {r['system']} | {r['N']} | {r['tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{r['scale']:.2f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | "
                     f"{r['rss_mb']:.0f} |")
    return "\n".join(lines)


def measure_model(model: str, precision: str, Ns: list[int], a, wd: Path) -> list[dict]:
    """Every system's server up at once (idle ones use no CPU), warmed up; then for each N, --rounds rounds,
    each running every system in turn (the order rotating), so the machine's drift falls on all alike."""
    name = f"{model} {precision}"
    ours_dir = prepare_ours(model, precision, wd)
    prompts = {N: [make_prompts(ours_dir, N, a.prompt_len, seed=1000 * r + N) for r in range(a.rounds)] for N in Ns}
    warm = make_prompts(ours_dir, 1, a.prompt_len, seed=99)
    servers, rows = {}, []
    try:
        for system in a.systems.split(","):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            try:
                argv, facts = server_command(system, model, precision, a, wd, port)
                log(f"{name} {system}: starting {' '.join(argv[:4])} ...")
                proc = start(argv, wd / "logs" / f"serve-{system}-{model}-{precision}.log", url)
                asyncio.run(round_(url, warm, a.new_tokens))
                servers[system] = (proc, url, facts)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is a row saying why
                log(f"{system}: unavailable: {e}")
                rows.append(dict(model=name, system=system, error=str(e)))
        results = {(sy, N): [] for sy in servers for N in Ns}
        order = list(servers)
        for N in Ns:
            for r in range(a.rounds):
                for system in order[r % len(order):] + order[:r % len(order)]:
                    proc, url, _ = servers[system]
                    try:
                        s = summarize(asyncio.run(round_(url, prompts[N][r], a.new_tokens)), a.new_tokens)
                    except Exception as e:  # noqa: BLE001
                        s = {"error": str(e)}
                    s["rss_mb"] = peak_rss_mb(proc.pid)
                    results[system, N].append(s)
                    log(f"{system} N={N} round {r + 1}: " + (f"{s['tok_s']:.1f} tok/s, TTFT p50 {s['ttft_p50_ms']:.0f} ms, "
                        f"ITL p50/p99 {s['itl_p50_ms']:.1f}/{s['itl_p99_ms']:.1f} ms" if "error" not in s else s["error"]))
        import numpy as np
        for system, (_, _, facts) in servers.items():
            base = None
            for N in Ns:
                runs = results[system, N]
                bad = [x["error"] for x in runs if "error" in x]
                if bad:
                    rows.append(dict(model=name, system=system, N=N, error=bad[0]))
                    continue
                med = {k: float(np.median([x[k] for x in runs])) for k in runs[0] if k != "rss_mb"}
                base = base or (med["decode_tok_s"] if N == 1 else None)
                row = dict(model=name, system=system, N=N, **med, rss_mb=max(x["rss_mb"] for x in runs),
                           scale=med["decode_tok_s"] / base if base else float("nan"), rounds=runs, **facts)
                if system == "ours":
                    row["rss_budget_mb"] = (facts["weights_mb"] + 400 + N * (a.prompt_len + a.new_tokens)
                                            * facts["kv_bytes_per_token"] / 2**20)
                rows.append(row)
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
    return rows


def parse_args(doc: str, *, systems: str, concurrency: str):
    """(args, workdir, [N]) of a serving benchmark (this one, bench_structured.py): the same options."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2:int8,1.1b-bpe:int4")
    ap.add_argument("--systems", default=systems)
    ap.add_argument("--concurrency", default=concurrency)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="Rounds per N; each figure is the median.")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/llamaexport-bench"))
    ap.add_argument("--json")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    return a, wd, [int(n) for n in a.concurrency.split(",")]


def main():
    a, wd, Ns = parse_args(__doc__, systems="ours,genai,llamacpp", concurrency="1,2,4,8")
    rows = []
    for spec in a.models.split(","):
        model, precision = spec.split(":")
        rows += measure_model(model, precision, Ns, a, wd)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} CPUs, --threads {a.threads}, prompt {a.prompt_len} tokens, "
          f"{a.new_tokens} new tokens, our --max-batch {a.max_batch}\n")
    print(table(rows))
    for r in rows:
        if r.get("system") == "ours" and "rss_budget_mb" in r:
            print(f"ours {r['model']} N={r['N']}: peak RSS {r['rss_mb']:.0f} MB, budget {r['rss_budget_mb']:.0f} MB "
                  f"(weights {r['weights_mb']:.0f} + KV + 400)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
