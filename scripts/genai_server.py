#!/usr/bin/env python
"""OpenAI-style completions over onnxruntime-genai 0.18's `og.Engine`: the genai peer of scripts/bench_serve.py.

    python scripts/genai_server.py MODEL_DIR --port P [--host 127.0.0.1] [--threads N] [--max-batch N] [--gather-ms 10]

MODEL_DIR holds genai_config.json (the genai model builder's output). GET /health. POST /v1/completions {"prompt":
text or token ids, "max_tokens", "temperature", "top_p", "top_k", "stream", "ignore_eos", "min_tokens"}: SSE
text_completion chunks (one per token, one with finish_reason, [DONE]), or one JSON with text and usage.

How the Engine is driven (0.18; microsoft/onnxruntime-genai docs/engine_c_api_spec.md, docs/paged_attention_engine.md):
all Engine/Request calls must come from the thread that made the Engine, so one engine thread owns it and handlers
queue commands to it. Per request: `engine.create_request(options=RequestOptions)` (`set_max_session_tokens`), then
`request.begin_turn(ids, TurnOptions)` (`set_max_generated_tokens`; greedy `set_do_sample(False)`; ignore_eos:
`set_min_generated_tokens(max_tokens)`, which masks EOS). The thread pumps `engine.run(buffer)` while
`engine.has_pending_requests()`, each call one batched step over the admitted Requests; its events (TOKEN /
TURN_FINISHED flags, token, finish_reason, usage) reach the request's asyncio.Queue by `loop.call_soon_threadsafe`.
A client that leaves gets `request.cancel_turn(turn_id)`; a finished Request is `close()`d.

Batching: continuous only under `engine.dynamic_batching` (paged-attention builds: the 0.18 builder allows CUDA and
WebGPU only). A CPU build gets 0.18's static batch scheduler: queued Requests start together, at most 4 (hard-coded;
engine.static_batching.max_batch_size does not raise it), and a Request arriving mid-batch waits for the whole batch
to finish. Hence an idle engine waits --gather-ms after a request for simultaneous ones to join its batch.
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
except ImportError as e:  # run it with a Python that has both onnxruntime-genai and these
    raise SystemExit(f"genai_server needs starlette, uvicorn and sse-starlette ({e.name} is missing)") from None

F = og.EngineEventFlags
LENGTH = {og.FinishReason.MAX_GENERATED_TOKENS, og.FinishReason.MAX_SESSION_TOKENS}


class Job:
    """One HTTP request: its prompt and options for the engine thread, and the queue its events come back on."""
    _ids = itertools.count()

    def __init__(self, ids: list[int], max_tokens: int, opts: dict):
        self.ids, self.max_tokens, self.opts = ids, max_tokens, opts
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.rid, self.t0 = f"cmpl-genai-{next(self._ids)}", time.perf_counter()
        self.request = self.turn = None
        self.cancelled = self.done = False

    def put(self, item):  # on the engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineThread(threading.Thread):
    """Creates og.Engine and makes every Engine/Request call (0.18's owner-thread rule)."""

    def __init__(self, model, max_batch: int, gather_ms: float):
        super().__init__(daemon=True, name="genai-engine")
        self.model, self.max_batch, self.gather = model, max_batch, gather_ms / 1000
        self.commands: queue.SimpleQueue = queue.SimpleQueue()  # ("submit" | "cancel", Job) from the handlers
        self.waiting: list[Job] = []  # submitted, not begun (more than --max-batch at once)
        self.active: dict = {}  # og.Request -> Job: begun, turn not finished
        self.ready = threading.Event()

    def _command(self, cmd: str, job: Job):
        if cmd == "submit" and not job.cancelled:
            self.waiting.append(job)
        elif cmd == "cancel" and job.request is not None and not job.done:
            job.request.cancel_turn(job.turn)  # the engine answers with TURN_FINISHED, reason CANCELLED
        elif cmd == "cancel" and job in self.waiting:
            self.waiting.remove(job)

    def _begin(self, job: Job):
        o, T = job.opts, job.max_tokens
        try:
            ro = og.RequestOptions()
            ro.set_max_session_tokens(len(job.ids) + T)
            req = self.engine.create_request(options=ro)
            to = og.TurnOptions(req)
            to.set_max_generated_tokens(T)
            if o["min_tokens"]:
                to.set_min_generated_tokens(min(o["min_tokens"], T))
            to.set_do_sample(o["temperature"] > 0)
            if o["temperature"] > 0:
                to.set_temperature(o["temperature"])
                to.set_top_p(o["top_p"])
                if o["top_k"] is not None:
                    to.set_top_k(o["top_k"])
            job.turn = req.begin_turn(np.asarray(job.ids, dtype=np.int32), to)
        except Exception as e:  # noqa: BLE001 - a rejected turn fails its own request only
            return job.put(("error", f"{type(e).__name__}: {e}"))
        job.request = req
        self.active[req] = job

    def run(self):
        try:
            self.engine = og.Engine(self.model)
            buf = self.engine.create_event_buffer(256)
            self.engine_max_batch = self.engine.get_capabilities().configured_max_batch_size
        finally:
            self.ready.set()  # main() checks that the engine exists
        while True:
            idle = not self.waiting and not self.engine.has_pending_requests()
            try:  # block for work when idle, else take what has arrived
                self._command(*self.commands.get(timeout=None if idle else 0))
                while True:
                    self._command(*self.commands.get_nowait())
            except queue.Empty:
                pass
            if self.waiting and not self.active and self.gather:  # let simultaneous arrivals share the batch
                end = self.waiting[0].t0 + self.gather
                while len(self.waiting) < self.max_batch and (left := end - time.perf_counter()) > 0:
                    try:
                        self._command(*self.commands.get(timeout=left))
                    except queue.Empty:
                        break
            while self.waiting and len(self.active) < self.max_batch:
                self._begin(self.waiting.pop(0))
            if not self.engine.has_pending_requests():
                continue
            for ev in self.engine.run(buf):  # one batched step (or retained events)
                job = self.active.get(ev.request) if ev.request is not None else None
                if job is None:
                    if ev.flags & F.FAILED:  # an engine-level failure: nothing runs any more
                        for j in self.active.values():
                            j.done = True
                            j.put(("error", f"the engine failed ({ev.error_code.name})"))
                        self.active.clear()
                    continue
                if ev.flags & F.TOKEN:
                    job.put(("token", ev.token))
                if ev.flags & F.TURN_FINISHED:
                    job.done = True
                    if ev.finish_reason in (og.FinishReason.FAILED, og.FinishReason.CANCELLED):
                        job.put(("error", f"generation {ev.finish_reason.name.lower()} ({ev.error_code.name})"))
                    else:
                        job.put(("finish", "length" if ev.finish_reason in LENGTH else "stop",
                                 ev.usage.prompt_tokens, ev.usage.generated_tokens))
                    del self.active[job.request]
                    job.request.close()


def error(msg: str, status: int = 400, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": msg, "type": kind, "param": None, "code": None}}, status_code=status)


def create_app(engine: EngineThread, tokenizer, name: str, ctx: int, vocab: int) -> Starlette:
    def chunk(job: Job, text: str, reason=None) -> str:
        return json.dumps({"id": job.rid, "object": "text_completion", "created": int(time.time()), "model": name,
                           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]})

    def give_up(job: Job):  # the response ended early (client gone): stop its generation
        if not job.done:
            job.cancelled = True
            engine.commands.put(("cancel", job))

    async def stream(job: Job):
        ts = tokenizer.create_stream()
        try:
            while True:
                ev = await job.events.get()
                if ev[0] == "token":
                    yield {"data": chunk(job, ts.decode(ev[1]))}
                    continue
                yield {"data": chunk(job, "", ev[1]) if ev[0] == "finish" else
                       json.dumps({"error": {"message": ev[1], "type": "server_error"}})}
                break
            yield {"data": "[DONE]"}
        finally:  # also when sse_starlette closes the generator because the client disconnected
            give_up(job)

    async def whole(request, job: Job):
        toks, check = [], time.monotonic() + 0.5
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    ev = ("wait",)
                if time.monotonic() > check:  # every 0.5 s, tokens flowing or not: is the client still there?
                    check = time.monotonic() + 0.5
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                if ev[0] == "token":
                    toks.append(ev[1])
                elif ev[0] != "wait":
                    break
        finally:
            give_up(job)
        if ev[0] == "error":
            return error(ev[1], 500, "server_error")
        text = tokenizer.decode(np.asarray(toks, dtype=np.int32)) if toks else ""
        return JSONResponse({"id": job.rid, "object": "text_completion", "created": int(time.time()), "model": name,
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": ev[1]}],
                             "usage": {"prompt_tokens": ev[2], "completion_tokens": ev[3],
                                       "total_tokens": ev[2] + ev[3]}})

    async def completions(request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error("the request body must be a JSON object")
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str) and p:
            ids = [int(t) for t in tokenizer.encode(p)]
        elif isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab for t in p):
            ids = p
        else:
            return error(f"prompt must be a non-empty string or a list of token ids in [0, {vocab})")
        try:
            T = int(body.get("max_tokens") or 16)
            opts = dict(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                        top_k=None if body.get("top_k") is None else int(body["top_k"]),
                        min_tokens=T if body.get("ignore_eos") else int(body.get("min_tokens") or 0))
        except (TypeError, ValueError) as e:
            return error(f"bad sampling field: {e}")
        if T < 1 or opts["temperature"] < 0 or len(ids) + T > ctx:
            return error(f"need max_tokens >= 1, temperature >= 0, prompt ({len(ids)}) + max_tokens <= {ctx}")
        if body.get("stop"):
            return error("stop strings need genai's dynamic batching; this engine batches statically")
        job = Job(ids, T, opts)
        engine.commands.put(("submit", job))
        if body.get("stream"):
            return EventSourceResponse(stream(job), ping=15, sep="\n")
        return await whole(request, job)

    async def health(request):
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/health", health), Route("/v1/completions", completions, methods=["POST"])])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of the decoder session")
    ap.add_argument("--max-batch", type=int, default=4, help="requests begun at once (a CPU engine batches <= 4)")
    ap.add_argument("--gather-ms", type=float, default=10.0, help="an idle engine's wait for simultaneous requests")
    a = ap.parse_args()
    cfg_json = json.loads((a.model_dir / "genai_config.json").read_text())
    overlay: dict = {}
    if a.threads:
        overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": a.threads}}}
    if "engine" not in cfg_json:
        overlay["engine"] = {"static_batching": {"max_batch_size": a.max_batch}}
    cfg = og.Config(str(a.model_dir))
    cfg.overlay(json.dumps(overlay))
    model = og.Model(cfg)
    engine = EngineThread(model, a.max_batch, a.gather_ms)
    engine.start()
    engine.ready.wait()
    if not hasattr(engine, "engine_max_batch"):
        raise SystemExit("og.Engine could not be created (see the error above)")
    ctx = min(cfg_json["search"].get("max_length") or 1 << 30, cfg_json["model"].get("context_length") or 1 << 30)
    name = a.model_dir.resolve().name
    mode = "dynamic (continuous)" if "dynamic_batching" in cfg_json.get("engine", {}) else "static"
    print(f"genai {og.__version__}: serving {a.model_dir} as {name!r} on http://{a.host}:{a.port}/v1 ({mode} batching, engine "
          f"max batch {engine.engine_max_batch}, --max-batch {a.max_batch}, threads {a.threads or 'default'})", file=sys.stderr)
    app = create_app(engine, og.Tokenizer(model), name, ctx, cfg_json["model"]["vocab_size"])
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False, lifespan="off")


if __name__ == "__main__":
    main()
