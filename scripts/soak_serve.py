#!/usr/bin/env python
"""Soak test of `llamaexport serve`: many requests of random lengths at high concurrency, some cancelled.

    python scripts/soak_serve.py ARTIFACT [--requests 500] [--concurrency 16] [--cancel 0.1] [--max-batch 8]
                                 [--max-queue 4] [--threads 2] [--seed 0]

Each of --concurrency workers sends requests one after another until --requests have been sent: prompts of
8-256 tokens (random words of the model's vocabulary; a fifth of them extend an earlier prompt, so prefix
reuse is exercised), 1-128 new tokens, greedy or sampled, mostly streamed. A --cancel share of the streamed
ones is dropped by the client after a few chunks. A 429 (more than --max-batch + --max-queue at once) is
retried after its Retry-After and counted, not an error. Everything else that is not a complete answer
(a non-200 status, a stream without [DONE], a connection error) is an error.
Passes (exit 0) when: no errors; /metrics shows 0 active and 0 queued sequences at the end; the server's RSS,
sampled after every request, grew less than 5% from the mean of the second hundred requests to the mean of
the last hundred.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from llamaexport.verify.bench import free_port, rss_mb


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def soak(a, url: str, pid: int, words: list[str]) -> dict:
    import httpx

    rng = random.Random(a.seed)
    stats = {"ok": 0, "cancelled": 0, "retried_429": 0, "errors": [], "rss": []}
    sent = 0
    history: list[str] = []

    def next_request():
        nonlocal sent
        if sent >= a.requests:
            return None
        sent += 1
        if history and rng.random() < 0.2:
            prompt = rng.choice(history) + " " + " ".join(rng.choices(words, k=rng.randint(4, 40)))
        else:
            prompt = " ".join(rng.choices(words, k=rng.randint(8, 256)))
        history.append(prompt)
        stream = rng.random() < 0.8
        body = {"prompt": prompt, "max_tokens": rng.randint(1, 128), "stream": stream,
                "temperature": rng.choice([0, 0, 0.7]), "seed": rng.randint(0, 1000)}
        return body, stream and rng.random() < a.cancel

    async def busy(r) -> bool:
        """A 429: count it and wait its Retry-After (the caller sends again). Any other non-200 fails."""
        if r.status_code == 429:
            stats["retried_429"] += 1
            await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            return True
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        return False

    async def one(client, body, cancel):
        while True:
            if body["stream"]:
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    if await busy(r):
                        continue
                    chunks, done = 0, False
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            d = json.loads(line[6:])
                            if "error" in d:
                                raise RuntimeError(f"error chunk: {d['error']}")
                            chunks += 1
                            if cancel and chunks >= 2:
                                stats["cancelled"] += 1
                                return  # leaving the block closes the connection mid-stream
                    if not done:
                        raise RuntimeError("stream ended without [DONE]")
            else:
                r = await client.post(url + "/v1/completions", json=body)
                if await busy(r):
                    continue
                r.json()["choices"][0]["text"]  # noqa: B018 - a complete answer
            stats["ok"] += 1
            return

    async def worker(client):
        while (job := next_request()) is not None:
            try:
                await one(client, *job)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
            stats["rss"].append(rss_mb(pid))
            done = stats["ok"] + stats["cancelled"] + len(stats["errors"])
            if done % 50 == 0:
                print(f"[soak] {done}/{a.requests} requests, {stats['retried_429']} 429s retried, "
                      f"{len(stats['errors'])} errors, RSS {stats['rss'][-1]:.0f} MB", file=sys.stderr, flush=True)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=a.concurrency * 2)) as client:
        await asyncio.gather(*(worker(client) for _ in range(a.concurrency)))
        for _ in range(100):  # cancelled streams free their slots at the next step
            m = (await client.get(url + "/metrics")).text
            if metric(m, "llamaexport_active_sequences") == 0 and metric(m, "llamaexport_queued_requests") == 0:
                break
            await asyncio.sleep(0.1)
        stats["active_end"] = metric(m, "llamaexport_active_sequences")
        stats["queued_end"] = metric(m, "llamaexport_queued_requests")
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cancel", type=float, default=0.1)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import httpx

    from llamaexport.model.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(a.artifact))
    words = [w for w in (tok.decode([i]).strip() for i in range(3, min(tok.vocab_size, 20000)))
             if w.isascii() and w.isalnum() and len(w) > 1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "llamaexport.cli", "serve", a.artifact, "--port", str(port),
                             "--max-batch", str(a.max_batch), "--max-queue", str(a.max_queue), "--threads",
                             str(a.threads)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        t0 = time.perf_counter()
        s = asyncio.run(soak(a, url, proc.pid, words))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    rss = s["rss"]
    second = sum(rss[100:200]) / len(rss[100:200]) if len(rss) >= 200 else float("nan")
    last = sum(rss[-100:]) / len(rss[-100:])
    growth = (last - second) / second * 100
    print(f"soak: {a.requests} requests in {wall:.0f}s at concurrency {a.concurrency} (--max-batch {a.max_batch}, "
          f"--max-queue {a.max_queue}): {s['ok']} complete, {s['cancelled']} cancelled by the client, "
          f"{s['retried_429']} 429s retried, {len(s['errors'])} errors")
    print(f"end: {s['active_end']:.0f} active, {s['queued_end']:.0f} queued; RSS mean requests 100-199 {second:.0f} MB, "
          f"last 100 {last:.0f} MB ({growth:+.1f}%), peak {max(rss):.0f} MB; server exit {proc.returncode}")
    for e in s["errors"][:10]:
        print("  error:", e)
    ok = (not s["errors"] and s["active_end"] == 0 and s["queued_end"] == 0 and growth < 5 and proc.returncode == 0
          and "Traceback" not in err)
    if "Traceback" in err:
        print(err[-2000:])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
