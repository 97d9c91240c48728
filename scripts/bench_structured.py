#!/usr/bin/env python
"""Structured-output benchmark: what a JSON schema on every request costs, ours beside llama.cpp's server.

    python scripts/bench_structured.py [--models smollm2:int8,1.1b-bpe:int4] [--systems ours,llamacpp]
                                       [--concurrency 1,4] [--prompt-len 64] [--new-tokens 128] [--rounds 3]
                                       [--threads 2] [--max-batch 8] [--workdir DIR] [--json OUT]

Servers and weights as scripts/bench_serve.py (ours: `llamaexport serve` on our build; llamacpp:
llama-cpp-python's server on llama.cpp's own quantization of the same weights, Q8_0 for int8, Q4_0 for int4).
Requests: POST /v1/chat/completions, stream, greedy, N concurrent clients, each with its own prompt ("Extract
every person named in this text as JSON records" + --prompt-len tokens of random words), in two modes:
- none: no constraint; `ignore_eos` (ours) / `min_tokens` (llama.cpp) so every reply has --new-tokens tokens;
- schema: every request under RECORDS (an object holding an array of at least 40 records of four typed,
  bounded fields, strict), as each server takes it: ours `response_format: {"type": "json_schema", ...}`,
  llama-cpp-python `{"type": "json_object", "schema": ...}` (its only form; it compiles the schema to a GBNF
  grammar). 40 records are ~800 tokens, so the grammar cannot end a reply before --new-tokens: both modes
  generate the same count, and every schema reply must end with finish_reason "length".
Rounds as bench_serve: all servers up and warmed (both modes), then for each N, --rounds rounds each running
every (system, mode) once, the order rotating; a figure is the median over rounds. Figures per (system, N, mode):
aggregate tok/s = generated tokens (streamed chunks with text) / (last end - first send); decode tok/s =
without the first prefill (bench_serve's definition); "kept" = schema decode tok/s / none decode tok/s.
Mask cost (ours, in this process, after the runs): every schema reply's text, re-tokenized by our tokenizer,
is replayed through runtime.constraint.Constraint: per token, the mask fill (llguidance, the part the engine
overlaps with the forward on a worker thread) and the apply (on the engine thread, in the token's critical
path), median and p99 in microseconds; every reply must be a prefix the schema accepts.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_serve as bs  # noqa: E402 - the servers, their startup and the prompt maker

from llamaexport.verify.bench import free_port, peak_rss_mb  # noqa: E402

_STR = {"type": "string", "maxLength": 24}
RECORDS = {
    "type": "object",
    "properties": {"people": {"type": "array", "minItems": 40, "items": {
        "type": "object",
        "properties": {"name": _STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "city": _STR,
                       "role": {"enum": ["engineer", "teacher", "doctor", "artist", "farmer", "other"]}},
        "required": ["name", "age", "city", "role"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False,
}
MODES = ("none", "schema")


def log(msg):
    print(f"[bench-structured {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def request_body(system: str, mode: str, prompt: str, new_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": "Extract every person named in this text as JSON records "
                                                     f"(name, age, city, role).\n\n{prompt}"}],
            "max_tokens": new_tokens, "temperature": 0, "stream": True}
    if mode == "none":
        body.update({"ignore_eos": True} if system == "ours" else {"min_tokens": new_tokens})
    elif system == "ours":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "records", "schema": RECORDS, "strict": True}}
    else:
        body["response_format"] = {"type": "json_object", "schema": RECORDS}
    return body


async def one_stream(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    stamps, text, finish = [], [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            for c in d.get("choices") or ():
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    stamps.append(time.perf_counter())
                    text.append(piece)
                finish = c.get("finish_reason") or finish
    return {"t0": t0, "stamps": stamps, "end": time.perf_counter(), "text": "".join(text), "finish": finish}


async def round_(url: str, bodies: list[dict]) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=64)) as client:
        return await asyncio.gather(*(one_stream(client, url, b) for b in bodies))


def summarize(results: list[dict]) -> dict:
    t0 = min(r["t0"] for r in results)
    end = max(r["end"] for r in results)
    first = min(r["stamps"][0] for r in results if r["stamps"])
    tokens = sum(len(r["stamps"]) for r in results)
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"tok_s": tokens / (end - t0), "decode_tok_s": (tokens - len(results)) / (end - first),
            "tokens_per_reply": tokens / len(results), "itl_p50_ms": bs.pct(itl, 50) * 1e3,
            "itl_p99_ms": bs.pct(itl, 99) * 1e3,
            "finish": sorted({r["finish"] for r in results}, key=str)}


def mask_cost(artifact: Path, texts: list[str]) -> dict:
    """Replay each schema reply through our Constraint: per-token fill and apply times (us)."""
    from llamaexport.model.tokenizer import load_tokenizer
    from llamaexport.runtime.constraint import Constraint, compile_constraint

    tok = load_tokenizer(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    n_vocab = manifest["model"].get("vocab_size", tok.vocab_size)  # the logits' width
    g = compile_constraint({"type": "json_schema", "json_schema": {"name": "records", "schema": RECORDS,
                                                                     "strict": True}}, tok, n_vocab=n_vocab)
    fill, apply, refused = [], [], 0
    row = np.zeros(n_vocab, np.float32)
    for text in texts:
        c = Constraint(g)
        for t in tok.encode(text, add_bos=False):
            s = time.perf_counter()
            c.fill_mask()
            m = time.perf_counter()
            c.apply(row)
            e = time.perf_counter()
            fill.append((m - s) * 1e6)
            apply.append((e - m) * 1e6)
            row.fill(0)
            if not c.consume(t):
                refused += 1
                break
    return {"tokens": len(fill), "fill_p50_us": bs.pct(fill, 50), "fill_p99_us": bs.pct(fill, 99),
            "apply_p50_us": bs.pct(apply, 50), "apply_p99_us": bs.pct(apply, 99), "refused_replies": refused}


def measure_model(model: str, precision: str, Ns: list[int], a, wd: Path) -> tuple[list[dict], dict]:
    name = f"{model} {precision}"
    ours_dir = bs.prepare_ours(model, precision, wd)
    prompts = {N: [bs.make_prompts(ours_dir, N, a.prompt_len, seed=1000 * r + N) for r in range(a.rounds)]
               for N in Ns}
    warm = bs.make_prompts(ours_dir, 1, a.prompt_len, seed=99)
    servers, rows, schema_texts = {}, [], []
    try:
        for system in a.systems.split(","):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            try:
                argv, _ = bs.server_command(system, model, precision, a, wd, port)
                log(f"{name} {system}: starting {' '.join(argv[:4])} ...")
                proc = bs.start(argv, wd / "logs" / f"structured-{system}-{model}-{precision}.log", url)
                for mode in MODES:
                    asyncio.run(round_(url, [request_body(system, mode, warm[0], a.new_tokens)]))
                servers[system] = (proc, url)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is a row saying why
                log(f"{system}: unavailable: {e}")
                rows.append(dict(model=name, system=system, error=str(e)))
        runs = [(sy, mode) for sy in servers for mode in MODES]
        results = {(sy, mode, N): [] for sy, mode in runs for N in Ns}
        for N in Ns:
            for r in range(a.rounds):
                k = r % len(runs)
                for system, mode in runs[k:] + runs[:k]:
                    proc, url = servers[system]
                    bodies = [request_body(system, mode, p, a.new_tokens) for p in prompts[N][r]]
                    try:
                        out = asyncio.run(round_(url, bodies))
                        s = summarize(out)
                        if mode == "schema" and system == "ours":
                            schema_texts += [o["text"] for o in out]
                    except Exception as e:  # noqa: BLE001
                        s = {"error": str(e)}
                    s["rss_mb"] = peak_rss_mb(proc.pid)
                    results[system, mode, N].append(s)
                    log(f"{system} {mode} N={N} round {r + 1}: " + (
                        f"{s['decode_tok_s']:.1f} decode tok/s, {s['tokens_per_reply']:.0f} tokens/reply, "
                        f"finish {s['finish']}" if "error" not in s else s["error"]))
        for system in servers:
            for N in Ns:
                base = None
                for mode in MODES:
                    got = results[system, mode, N]
                    bad = [x["error"] for x in got if "error" in x]
                    if bad:
                        rows.append(dict(model=name, system=system, N=N, mode=mode, error=bad[0]))
                        continue
                    med = {k: float(np.median([x[k] for x in got])) for k in got[0] if k not in ("rss_mb", "finish")}
                    base = base or med["decode_tok_s"]
                    rows.append(dict(model=name, system=system, N=N, mode=mode, **med,
                                     finish=sorted({f for x in got for f in x["finish"]}, key=str),
                                     kept=med["decode_tok_s"] / base, rss_mb=max(x["rss_mb"] for x in got)))
    finally:
        for proc, _ in servers.values():
            bs.stop(proc)
    cost = mask_cost(ours_dir, schema_texts) if schema_texts else {}
    return rows, cost


def table(rows) -> str:
    head = ["model", "system", "N", "mode", "tok/s", "decode tok/s", "kept", "tokens/reply", "ITL p50 ms",
            "ITL p99 ms", "finish"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['system']} | {r.get('N', '')} | {r.get('mode', '')} | "
                         f"n/a ({r['error'][:80]}) |" + " |" * 6)
            continue
        lines.append(f"| {r['model']} | {r['system']} | {r['N']} | {r['mode']} | {r['tok_s']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['kept']:.1%} | {r['tokens_per_reply']:.0f} | "
                     f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {', '.join(map(str, r['finish']))} |")
    return "\n".join(lines)


def main():
    a, wd, Ns = bs.parse_args(__doc__, systems="ours,llamacpp", concurrency="1,4")
    rows, costs = [], {}
    for spec in a.models.split(","):
        model, precision = spec.split(":")
        got, costs[spec] = measure_model(model, precision, Ns, a, wd)
        rows += got
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} CPUs, --threads {a.threads}, prompt {a.prompt_len} tokens of random words, "
          f"{a.new_tokens} new tokens, our --max-batch {a.max_batch}\n")
    print(table(rows))
    print("\nmask cost per token (ours, replayed; fill overlaps the forward, apply is on the token's path):")
    for spec, c in costs.items():
        if c:
            print(f"  {spec}: {c['tokens']} tokens, fill p50 {c['fill_p50_us']:.0f} us / p99 {c['fill_p99_us']:.0f} us, "
                  f"apply p50 {c['apply_p50_us']:.0f} us / p99 {c['apply_p99_us']:.0f} us, "
                  f"replies the schema refused: {c['refused_replies']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "mask_cost": costs}, indent=1))


if __name__ == "__main__":
    main()
