#!/usr/bin/env python
"""An OpenAI-style completions server over onnxruntime-genai 0.18's `og.Engine` (a benchmark peer).

    python scripts/genai_server.py MODEL_DIR --port P [--host 127.0.0.1] [--threads N] [--max-batch N]

MODEL_DIR is a folder with genai_config.json (onnxruntime_genai.models.builder's output). Endpoints:
GET /health, GET /v1/models, POST /v1/completions ({"prompt": text or token ids, "max_tokens", "temperature",
"top_p", "top_k", "stream", "ignore_eos", "min_tokens"}; stream: SSE text_completion chunks, one per generated
token, a final chunk with finish_reason, then [DONE]).

How the engine is driven (the 0.18 Engine API; docs/engine_c_api_spec.md and docs/paged_attention_engine.md
of microsoft/onnxruntime-genai): one thread owns the Engine (it must: every Engine and Request call is
owner-thread-only). Handlers hand it commands through a queue; it creates a Request per HTTP request
(`engine.create_request(options=RequestOptions)` with `set_max_session_tokens(prompt + max_tokens)`),
starts it with `request.begin_turn(ids, TurnOptions)` (greedy: `set_do_sample(False)`; `ignore_eos`:
`set_min_generated_tokens(max_tokens)`, which masks EOS), and pumps `engine.run(buffer)` while
`engine.has_pending_requests()`. Each run executes one batched step over every admitted Request and returns
events (TOKEN / TURN_FINISHED flags, token, finish_reason, usage), which go to the request's asyncio.Queue via
`loop.call_soon_threadsafe`. A client that goes away gets `request.cancel_turn(turn_id)`.
Batching: with `engine.dynamic_batching` in genai_config.json (paged-attention builds: CUDA/WebGPU only)
the Engine batches continuously. A CPU build has no engine section, so 0.18 uses its static batch scheduler:
queued Requests are admitted together (at most 4 per batch, whatever engine.static_batching.max_batch_size
says) and decode as one batch; a Request arriving mid-batch waits until that whole batch has finished.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

try:
    import uvicorn
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
except ImportError as e:  # the genai venv of bench_peers may lack them: run with a Python that has both
    raise SystemExit(f"genai_server needs starlette, uvicorn and sse-starlette ({e.name} is missing)") from None

F = og.EngineEventFlags
LENGTH = {og.FinishReason.MAX_GENERATED_TOKENS, og.FinishReason.MAX_SESSION_TOKENS}


class Job:
    """One HTTP request: what the engine thread needs, and the queue its events go to."""
    _ids = itertools.count()

    def __init__(self, ids, opts: dict, loop, max_tokens: int):
        self.ids, self.opts, self.loop, self.max_tokens = ids, opts, loop, max_tokens
        self.events: asyncio.Queue = asyncio.Queue()
        self.rid = f"cmpl-genai-{next(self._ids)}"
        self.request = self.turn = None
        self.cancelled = self.done = False

    def put(self, item):  # engine thread -> event loop
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed
            pass


class EngineThread(threading.Thread):
    """Owns og.Engine: every Engine/Request call happens here (the 0.18 owner-thread rule)."""

    def __init__(self, model, max_batch: int):
        super().__init__(daemon=True, name="genai-engine")
        self.model, self.max_batch = model, max_batch
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: list[Job] = []
        self.active: dict = {}  # og.Request -> Job (begun, not finished)
        self.ready = threading.Event()

    def submit(self, job):
        self.commands.put(("submit", job))

    def cancel(self, job):
        self.commands.put(("cancel", job))

    def _begin(self, job: Job):
        n, T, o = len(job.ids), job.max_tokens, job.opts
        try:
            ro = og.RequestOptions()
            ro.set_max_session_tokens(n + T)  # sizes the (static) KV cache of its batch
            req = self.engine.create_request(options=ro)
            to = og.TurnOptions(req)
            to.set_max_generated_tokens(T)
            if o["min_tokens"]:
                to.set_min_generated_tokens(min(o["min_tokens"], T))  # masks EOS until then
            if o["temperature"] == 0:
                to.set_do_sample(False)
            else:
                to.set_do_sample(True)
                to.set_temperature(o["temperature"])
                to.set_top_p(o["top_p"])
                if o["top_k"] is not None:
                    to.set_top_k(o["top_k"])
            job.turn = req.begin_turn(np.asarray(job.ids, dtype=np.int32), to)
        except Exception as e:  # noqa: BLE001 - a rejected turn fails its own request only
            job.put(("error", f"{type(e).__name__}: {e}"))
            return
        job.request = req
        self.active[req] = job

    def _command(self, cmd, job: Job):
        if cmd == "submit":
            if not job.cancelled:
                self.waiting.append(job)
        elif job.request is not None and not job.done:
            job.request.cancel_turn(job.turn)  # the engine then sends TURN_FINISHED (CANCELLED)
        elif job in self.waiting:
            self.waiting.remove(job)

    def run(self):
        self.engine = og.Engine(self.model)  # created here: this thread is its owner
        buf = self.engine.create_event_buffer(256)
        self.caps = self.engine.get_capabilities()
        self.ready.set()
        while True:
            busy = self.engine.has_pending_requests()
            try:  # block for work when idle, else just drain what arrived
                cmd = self.commands.get(timeout=None if not busy and not self.waiting else 0)
                while True:
                    self._command(*cmd)
                    cmd = self.commands.get_nowait()
            except queue.Empty:
                pass
            while self.waiting and len(self.active) < self.max_batch:
                self._begin(self.waiting.pop(0))
            if not self.engine.has_pending_requests():
                continue
            for ev in self.engine.run(buf):
                flags = ev.flags
                job = self.active.get(ev.request) if ev.request is not None else None
                if job is None:
                    if flags & F.FAILED:  # engine-level failure: nothing can run any more
                        for j in self.active.values():
                            j.put(("error", f"engine failed: {ev.error_code.name}"))
                        self.active.clear()
                    continue
                if flags & F.TOKEN:
                    job.put(("token", ev.token))
                if flags & F.TURN_FINISHED:
                    job.done = True
                    if flags & F.FAILED or ev.finish_reason in (og.FinishReason.FAILED, og.FinishReason.CANCELLED):
                        job.put(("error", f"generation {ev.finish_reason.name.lower()} ({ev.error_code.name})"))
                    else:
                        job.put(("finish", "length" if ev.finish_reason in LENGTH else "stop",
                                 ev.usage.prompt_tokens, ev.usage.generated_tokens))
                    del self.active[job.request]
                    job.request.close()


def bad(msg, status=400):
    return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": None}},
                        status_code=status)


def create_app(engine: EngineThread, tokenizer, name: str, ctx: int, vocab: int):
    async def health(request):
        return JSONResponse({"status": "ok"})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "genai"}]})

    async def completions(request):
        try:
            body = json.loads(await request.body())
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return bad("the request body must be a JSON object")
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str) and p:
            ids = [int(t) for t in tokenizer.encode(p)]
        elif isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab for t in p):
            ids = p
        else:
            return bad(f"prompt must be a non-empty string or a list of token ids in [0, {vocab})")
        try:
            T = int(body.get("max_tokens") or 16)
            temp = float(body.get("temperature", 1.0))
            opts = dict(temperature=temp, top_p=float(body.get("top_p", 1.0)),
                        top_k=None if body.get("top_k") is None else int(body["top_k"]),
                        min_tokens=T if body.get("ignore_eos") else int(body.get("min_tokens") or 0))
        except (TypeError, ValueError) as e:
            return bad(f"bad sampling field: {e}")
        if T < 1 or temp < 0 or len(ids) + T > ctx:
            return bad(f"need max_tokens >= 1, temperature >= 0 and prompt ({len(ids)}) + max_tokens <= {ctx}")
        if body.get("stop"):
            return bad("stop strings need genai's dynamic batching, which this (static-batch) engine lacks")
        job = Job(ids, opts, asyncio.get_running_loop(), T)
        engine.submit(job)
        if body.get("stream"):
            return EventSourceResponse(stream(job, name), ping=15, sep="\n")
        return await whole(request, job, name)

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/completions", completions, methods=["POST"])])

    def chunk(job, text, reason=None):
        return json.dumps({"id": job.rid, "object": "text_completion", "created": int(time.time()), "model": name,
                           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]})

    async def stream(job: Job, name):
        ts = tokenizer.create_stream()
        try:
            while True:
                ev = await job.events.get()
                if ev[0] == "token":
                    yield {"data": chunk(job, ts.decode(ev[1]))}
                elif ev[0] == "finish":
                    yield {"data": chunk(job, "", ev[1])}
                    break
                else:
                    yield {"data": json.dumps({"error": {"message": ev[1], "type": "server_error"}})}
                    break
            yield {"data": "[DONE]"}
        finally:  # normal end, or the client went away (the generator is closed)
            if not job.done:
                job.cancelled = True
                engine.cancel(job)

    async def whole(request, job: Job, name):
        toks = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if ev[0] == "token":
                    toks.append(ev[1])
                elif ev[0] == "error":
                    return JSONResponse({"error": {"message": ev[1], "type": "server_error"}}, status_code=500)
                else:
                    break
        finally:
            if not job.done:
                job.cancelled = True
                engine.cancel(job)
        text = tokenizer.decode(np.asarray(toks, dtype=np.int32)) if toks else ""
        return JSONResponse({"id": job.rid, "object": "text_completion", "created": int(time.time()), "model": name,
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": ev[1]}],
                             "usage": {"prompt_tokens": ev[2], "completion_tokens": ev[3],
                                       "total_tokens": ev[2] + ev[3]}})

    return app


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of the decoder session")
    ap.add_argument("--max-batch", type=int, default=4, help="requests begun at once (the CPU engine batches <= 4)")
    a = ap.parse_args()
    cfg_json = json.loads((a.model_dir / "genai_config.json").read_text())
    cfg = og.Config(str(a.model_dir))
    overlay: dict = {}
    if a.threads:  # Config.overlay: no patched copy of genai_config.json needed
        overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": a.threads}}}
    if "engine" not in cfg_json:
        overlay["engine"] = {"static_batching": {"max_batch_size": a.max_batch}}
    if overlay:
        cfg.overlay(json.dumps(overlay))
    model = og.Model(cfg)
    tokenizer = og.Tokenizer(model)
    engine = EngineThread(model, a.max_batch)
    engine.start()
    engine.ready.wait()
    caps = engine.caps
    ctx = min(cfg_json["search"].get("max_length") or 10**9, cfg_json["model"].get("context_length") or 10**9)
    name = a.model_dir.resolve().name
    mode = "dynamic (continuous)" if "dynamic_batching" in cfg_json.get("engine", {}) else "static"
    print(f"genai {og.__version__}: serving {a.model_dir} as {name!r} on http://{a.host}:{a.port}/v1 "
          f"({mode} batching, engine max batch {caps.configured_max_batch_size}, begun at once {a.max_batch}, "
          f"threads {a.threads or 'default'})", file=sys.stderr, flush=True)
    app = create_app(engine, tokenizer, name, ctx, cfg_json["model"]["vocab_size"])
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
