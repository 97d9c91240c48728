"""`llamaexport serve`: the OpenAI API over the serving engine (Starlette + uvicorn + SSE).

    POST /v1/chat/completions   the artifact's chat format; stream: true sends SSE chunks, then [DONE]
    POST /v1/completions        a text prompt (or a list of token ids)
    GET  /v1/models             the one model this server runs
    GET  /health                liveness (never needs the API key)
    GET  /metrics               Prometheus text

Handlers run on the event loop; the engine runs every forward on its own thread and hands each
request's events back through `loop.call_soon_threadsafe`. Errors are OpenAI's error JSON; a
bad request never reaches the engine, and a client that goes away cancels its generation (its
slot is free at the next step). Needs the `serve` extra: `pip install 'llamaexport[serve]'`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import signal
import sys
import threading
import time
from numbers import Real

from llamaexport import LlamaExportError, whole_number
from llamaexport.runtime.completion import FinishReason, check_generation
from llamaexport.runtime.engine import ContextTooLong, DoneEvent, Engine, QueueFull, ShuttingDown, TextEvent, check_limits
from llamaexport.runtime.sampling import MAX_TOP_LOGPROBS, SamplingConfig, check_logit_bias
from llamaexport.serving.choices import Reply

# The completions API's most alternatives per token (OpenAI's bound; chat's is MAX_TOP_LOGPROBS).
MAX_COMPLETION_LOGPROBS = 5

# Seconds that running generations get to finish after SIGTERM / Ctrl-C before they are cancelled.
SHUTDOWN_GRACE = 3.0
CANCELLED = "the server is shutting down; the generation was cancelled"


def _require_serve_deps():
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LlamaExportError(f"serving needs the serve extra ({e.name} is missing): "
                               "pip install 'llamaexport[serve]'") from None


class ApiError(Exception):
    """An error answered in OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}


def _error_response(status: int, message: str, *, param=None, code=None, type_="invalid_request_error", headers=None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


# ---------------------------------------------------------------------- request fields
def _bad(message: str, param: str | None = None, code: str | None = None):
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, name: str, default, lo: float, hi: float):
    v = body.get(name)
    if v is None:
        return default
    try:
        ok = not isinstance(v, bool) and isinstance(v, Real) and math.isfinite(v) and lo <= v <= hi
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        raise _bad(f"{name} must be a number from {lo} to {hi}, got {str(v)[:40]}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    try:
        return whole_number(v, name, at_least=lo, at_most=hi)
    except LlamaExportError as e:
        raise _bad(str(e), name) from None


def _flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise _bad(f"{name} must be true or false", name)
    return bool(v)


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) > 16 or any(not isinstance(s, str) or not s for s in v):
        raise _bad("stop must be a non-empty string or a list of up to 16 non-empty strings", "stop")
    return v


def _text_content(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise _bad(f"{where}: only text content parts are supported, got {kind!r}", "messages")
            parts.append(p["text"])
        return "".join(parts)
    raise _bad(f"{where}: content must be a string or a list of text parts", "messages")


ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(body: dict) -> list[dict]:
    """The chat's messages; an assistant turn's `tool_calls` and a tool result's `tool_call_id` are kept
    (model.tools.render_chat checks and renders them)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {got!r}", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        msg = {"role": role, "content": _text_content(m.get("content"), f"messages[{i}]")}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
            if m.get("name") is not None:
                msg["name"] = m["name"]
        out.append(msg)
    return out


# Refused with a 400 naming the field rather than ignored: the legacy function-calling fields (use tools),
# suffix a fill-in-the-middle model.
UNSUPPORTED = {"functions": "function calls (the legacy 'functions') are; use 'tools'",
               "function_call": "function calls (the legacy 'function_call') are; use 'tool_choice'",
               "suffix": "suffix (fill in the middle) is"}
# Compiled grammars kept, by spec (a request that repeats a schema skips the compile): most recent last.
GRAMMAR_CACHE = 32


def _constraint_spec(body: dict, chat: bool) -> dict | None:
    """The constraint a request asks for, as a runtime.constraint spec: response_format (json_object,
    json_schema; "text" is none), and on /v1/completions also `grammar` (GBNF or Lark) or `regex`. At most
    one of them."""
    asked = [k for k in ("response_format", "grammar", "regex") if body.get(k) is not None]
    if chat and any(k != "response_format" for k in asked):
        k = next(k for k in asked if k != "response_format")
        raise _bad(f"{k} is a /v1/completions parameter; on chat use response_format", k)
    if len(asked) > 1:
        raise _bad(f"give at most one of response_format, grammar and regex (got {', '.join(asked)})", asked[1])
    if not asked:
        return None
    key = asked[0]
    v = body[key]
    if key == "response_format":
        if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("response_format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}",
                       "response_format")
        return None if v["type"] == "text" else v
    if not isinstance(v, str) or not v:
        raise _bad(f"{key} must be a non-empty string", key)
    return {"type": "gbnf", "gbnf": v} if key == "grammar" else {"type": "regex", "regex": v}


class Api:
    """The endpoints, over one Engine. Built by `create_app`."""

    def __init__(self, engine: Engine, *, model_name: str, chat_format: str = "auto", api_key: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine, self.model = engine, engine.model
        self.name, self.chat_format, self.api_key = model_name, chat_format, api_key
        self.created = int(time.time())
        self._grammars: dict = {}  # (kind, spec JSON) -> compiled runtime.constraint.Grammar, LRU order
        self._grammars_lock = threading.Lock()
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("llamaexport_requests", "HTTP requests by endpoint and status",
                                  ["endpoint", "status"], registry=r)
        self.m_prompt = Counter("llamaexport_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.m_cached = Counter("llamaexport_cached_prompt_tokens", "Prompt tokens reused from the KV cache", registry=r)
        self.m_generated = Counter("llamaexport_generated_tokens", "Generated tokens", registry=r)
        Gauge("llamaexport_active_sequences", "Sequences in KV slots (prefilling or decoding)",
              registry=r).set_function(lambda: engine.counts()[0])
        Gauge("llamaexport_queued_requests", "Requests waiting for a slot", registry=r).set_function(
            lambda: engine.counts()[1])
        buckets = (.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10, 30)
        self.m_ttft = Histogram("llamaexport_time_to_first_token_seconds", "Arrival to first token",
                                buckets=buckets, registry=r)
        self.m_itl = Histogram("llamaexport_inter_token_latency_seconds", "Time between two tokens of a stream",
                               buckets=buckets, registry=r)

    # ------------------------------------------------------------------ helpers
    async def _body(self, request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _bad(f"the request body is not valid JSON ({str(e)[:200] or type(e).__name__})") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.name:
            raise ApiError(400, f"unknown model {model!r}; this server runs {self.name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        for key, what in UNSUPPORTED.items():
            v = body.get(key)
            if v not in (None, False, [], {}, "none") and not (key == "response_format" and v == {"type": "text"}):
                raise _bad(f"{what} not supported by this server; remove {key!r}", key)
        if body.get("best_of") not in (None, 1):
            raise _bad("best_of must be 1", "best_of")
        if not isinstance(body.get("stream", False), bool):
            raise _bad("stream must be true or false", "stream")
        opts = body.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)):
            raise _bad('stream_options must be an object like {"include_usage": true}', "stream_options")
        return body

    def _generation(self, body: dict, prompt_ids: list[int], stop: list[str], default_max: int | None, *,
                    chat: bool, echo: bool = False) -> dict:
        """The engine's arguments from the request's fields (whether they fit the context, n the slots:
        Engine.submit)."""
        ctx = self.engine.ctx
        max_tokens = _integer(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", 1)
        if max_tokens is None:
            max_tokens = max(1, min(default_max or ctx, ctx - len(prompt_ids)))
        try:
            sampling = SamplingConfig(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                                      top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                                      top_k=_integer(body, "top_k", 0) or 0,
                                      repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
                                      seed=_integer(body, "seed"),
                                      presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                                      frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                                      logit_bias=self._logit_bias(body))
        except LlamaExportError as e:
            raise _bad(str(e)) from None
        logprobs = self._logprobs(body, chat)
        return dict(max_new_tokens=max_tokens, sampling=sampling, stop=stop,
                    eos_ids=[] if _flag(body, "ignore_eos") else None, n=_integer(body, "n", 1) or 1,
                    logprobs=logprobs, prompt_logprobs=echo and logprobs is not None,
                    speculative=self._speculative(body))

    def _speculative(self, body: dict):
        """The request's runtime.speculative.Speculation: its "speculative" field (false, true, "ngram",
        {"method", "k", "ngram", "ngram_min"}) over the server's --speculative default."""
        from llamaexport.runtime.speculative import Speculation

        try:
            return Speculation.parse(body.get("speculative"), default=self.engine.speculative)
        except LlamaExportError as e:
            raise _bad(str(e), "speculative") from None

    def _logit_bias(self, body: dict) -> dict[int, float] | None:
        """{token id: bias}: JSON's string keys, each an id of the model's vocabulary, biases -100 .. 100."""
        try:
            return check_logit_bias(body.get("logit_bias"), self.model.config.vocab_size) or None
        except LlamaExportError as e:
            raise _bad(str(e), "logit_bias") from None

    @staticmethod
    def _logprobs(body: dict, chat: bool) -> int | None:
        """The alternatives per token to report (None: no logprobs). Chat: logprobs true and top_logprobs
        0 .. 20 (top_logprobs needs logprobs, as OpenAI's); completions: logprobs 0 .. 5."""
        if not chat:
            return _integer(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
        on = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not on:
            raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if on else None

    async def _grammar(self, key: tuple, compile_):
        """The compiled grammar for `key`, from the cache or compiled on a worker thread (a large schema
        takes up to a second; llguidance releases the GIL); BadConstraint / BadTools -> 400 naming the part."""
        from llamaexport.runtime.constraint import BadConstraint

        with self._grammars_lock:
            if key in self._grammars:
                self._grammars[key] = self._grammars.pop(key)  # most recently used
                return self._grammars[key]
        try:
            grammar = await asyncio.to_thread(compile_)
        except BadConstraint as e:
            raise _bad(str(e), e.param, "invalid_grammar") from None
        except LlamaExportError as e:  # llguidance missing, malformed tools
            raise _bad(str(e), getattr(e, "param", None)) from None
        with self._grammars_lock:
            self._grammars[key] = grammar
            while len(self._grammars) > GRAMMAR_CACHE:
                self._grammars.pop(next(iter(self._grammars)))
        return grammar

    async def _constraint(self, body: dict, chat: bool):
        """The compiled grammar of a request's response_format / grammar / regex, or None."""
        from llamaexport.runtime.constraint import compile_constraint

        spec = _constraint_spec(body, chat)
        if spec is None:
            return None
        key = ("spec", json.dumps(spec, sort_keys=True))
        return await self._grammar(key, lambda: compile_constraint(spec, self.model.tokenizer,
                                                                   n_vocab=self.model.config.vocab_size))

    def _encode_checked(self, text: str) -> list[int]:
        """The prompt's ids, once check_generation found the text encodable (the rest of the request is
        checked by Engine.submit, which calls it too)."""
        try:
            check_generation(prompt=text)
        except LlamaExportError as e:
            raise _bad(str(e)) from None
        return self.model.encode(text)

    # ------------------------------------------------------------------ endpoints
    async def chat(self, request):
        from llamaexport.model.chat import default_stop_strings, format_chat
        from llamaexport.model.tools import BadTools, check_tool_choice, check_tools, render_chat, tool_format

        body = await self._body(request)
        messages = _messages(body)
        tok = self.model.tokenizer
        tools, choice = body.get("tools"), body.get("tool_choice")
        try:
            functions = check_tools(tools)
            choice = check_tool_choice(choice, functions)
        except BadTools as e:
            raise _bad(str(e), e.param) from None
        calling = choice != "none"  # a reply that may hold tool calls
        history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        try:
            if functions or history:
                text = render_chat(messages, tools=tools, tool_choice=choice if functions else None, tokenizer=tok,
                                   fmt=self.chat_format)
            else:
                text = format_chat(messages, tokenizer=tok, fmt=self.chat_format)
        except BadTools as e:
            raise _bad(str(e), e.param) from None
        except LlamaExportError as e:
            raise _bad(str(e), "messages") from None
        stop = list(dict.fromkeys(default_stop_strings(self.chat_format) + _stop(body)))
        ids = self._encode_checked(text)
        gen = self._generation(body, ids, stop, None, chat=True)
        fmt = None
        if calling:
            if body.get("response_format") not in (None, {"type": "text"}):
                raise _bad("response_format and tools together are not supported: the reply follows either a "
                           "schema or the tool-call format (use tool_choice 'none' to answer with the schema)",
                           "response_format")
            fmt = tool_format(tok, self.chat_format)
            parallel = body.get("parallel_tool_calls", True)
            if not isinstance(parallel, bool):
                raise _bad("parallel_tool_calls must be true or false", "parallel_tool_calls")
            gen["grammar"] = await self._tools_grammar(tools, choice, fmt, parallel)
            gen["skip_special"] = False  # the format's markers may be special tokens: the parser needs them
        else:
            gen["grammar"] = await self._constraint(body, chat=True)
        if gen["grammar"] is not None and gen["eos_ids"] == []:
            raise _bad("ignore_eos cannot be used with response_format or tools: the grammar ends the reply",
                       "ignore_eos")
        reply = Reply(tok, chat=True, n=gen["n"], logprobs=gen["logprobs"] is not None, tool_format=fmt)
        return await self._respond(request, body, ids, gen, reply)

    async def _tools_grammar(self, tools, choice, fmt, parallel):
        from llamaexport.runtime.constraint import compile_tools

        key = ("tools", fmt, choice, parallel, json.dumps(tools, sort_keys=True))
        return await self._grammar(key, lambda: compile_tools(tools, choice, self.model.tokenizer, fmt=fmt,
                                                              n_vocab=self.model.config.vocab_size, parallel=parallel))

    async def completions(self, request):
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self._encode_checked(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            V = self.model.config.vocab_size
            if any(not 0 <= t < V for t in prompt):
                raise _bad(f"prompt token ids must be in [0, {V})", "prompt")
            ids = list(prompt)
        else:
            raise _bad("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")
        if not ids:
            raise _bad("the prompt is empty", "prompt")
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            if body.get(key) is not None:
                raise _bad(f"{key} is a /v1/chat/completions parameter", key)
        echo = _flag(body, "echo")
        gen = self._generation(body, ids, _stop(body), 16, chat=False, echo=echo)
        gen["grammar"] = await self._constraint(body, chat=False)
        if gen["grammar"] is not None and gen["eos_ids"] == []:
            raise _bad("ignore_eos cannot be used with a grammar: the grammar ends the reply", "ignore_eos")
        text = prompt if isinstance(prompt, str) else self.model.tokenizer.decode(ids)
        reply = Reply(self.model.tokenizer, chat=False, n=gen["n"], logprobs=gen["logprobs"] is not None,
                      echo=text if echo else None, prompt_ids=ids)
        return await self._respond(request, body, ids, gen, reply)

    async def _respond(self, request, body, ids, gen, reply: Reply):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev):  # the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is closed (shutting down): nobody is listening
                pass

        t0 = time.perf_counter()
        try:
            req = self.engine.submit(ids, on_event=on_event, **gen)
        except QueueFull as e:
            raise ApiError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), type_="server_error", headers={"Retry-After": "5"}) from None
        except ContextTooLong as e:
            param = "messages" if reply.chat and e.param == "prompt" else e.param
            raise _bad(str(e), param, "context_length_exceeded") from None
        except LlamaExportError as e:
            raise _bad(str(e), getattr(e, "param", None)) from None
        try:
            rid = ("chatcmpl-" if reply.chat else "cmpl-") + secrets.token_hex(12)
            timing = {"t0": t0, "last": None}
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return self._sse(self._chunks(events, rid, reply, include_usage, timing), req)
            return await self._whole(request, req, events, rid, reply, timing)
        except BaseException:
            self.engine.cancel(req)  # whatever went wrong, the generation must not run on unread
            raise

    def _timed(self, timing: dict):
        now = time.perf_counter()
        if timing["last"] is None:
            self.m_ttft.observe(now - timing["t0"])
        else:
            self.m_itl.observe(now - timing["last"])
        timing["last"] = now

    def _usage(self, dones: list[DoneEvent]) -> dict:
        """The prompt once (its KV is computed once for every choice: the first's cached tokens), and every
        choice's completion tokens."""
        first, generated = dones[0], sum(d.completion_tokens for d in dones)
        self.m_prompt.inc(first.prompt_tokens)
        self.m_cached.inc(first.cached_tokens)
        self.m_generated.inc(generated)
        return {"prompt_tokens": first.prompt_tokens, "completion_tokens": generated,
                "total_tokens": first.prompt_tokens + generated,
                "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}

    @staticmethod
    def _reason(done: DoneEvent) -> str:
        """OpenAI's finish_reason: "stop" (EOS or a stop string) or "length"; an error or a cancelled
        generation is answered with an error instead."""
        if done.finish_reason is FinishReason.ERROR:
            raise ApiError(500, done.error or "the model failed", type_="server_error")
        if done.finish_reason is FinishReason.CANCELLED:
            raise ApiError(503, CANCELLED, type_="server_error")
        return done.finish_reason.openai

    async def _whole(self, request, req, events, rid, reply: Reply, timing):
        """Wait for every choice's DoneEvent (a client that goes away cancels them), then the answer."""
        from starlette.responses import JSONResponse

        dones: dict[int, DoneEvent] = {}
        try:
            next_look = time.monotonic() + 0.5
            while len(dones) < reply.n:
                if time.monotonic() >= next_look:  # tokens may flow without a pause: look on the clock
                    next_look = time.monotonic() + 0.5
                    if await request.is_disconnected():  # (the finally below cancels)
                        return JSONResponse({}, status_code=499)
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    continue
                if isinstance(ev, DoneEvent):
                    dones[ev.index] = ev
                elif ev.token_id >= 0 and ev.index == 0:  # the first choice's pace: TTFT and ITL
                    self._timed(timing)
        finally:
            if not req.all_done:
                self.engine.cancel(req)
        done = [dones[i] for i in range(reply.n)]
        choices = [reply.choice(d, self._reason(d)) for d in done]
        obj = "chat.completion" if reply.chat else "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": self.name,
                             "system_fingerprint": None, "choices": choices, "usage": self._usage(done)})

    async def _chunks(self, events, rid, reply: Reply, include_usage, timing):
        """The SSE data of a streamed answer: chunks of each choice's text as it comes (with its `index`),
        each choice's finish_reason chunk, the usage chunk when asked, [DONE]; an error chunk instead if
        the generation failed or was cancelled."""
        created = int(time.time())
        obj = "chat.completion.chunk" if reply.chat else "text_completion"

        def chunk(choices, usage=None):
            c = {"id": rid, "object": obj, "created": created, "model": self.name, "system_fingerprint": None,
                 "choices": choices}
            if usage is not None:
                c["usage"] = usage
            return json.dumps(c, ensure_ascii=False)

        # a client that goes away is cancelled by the response itself (_sse), even before this starts
        for opening in reply.opening():  # chat: each choice's assistant role, as OpenAI's stream opens
            yield chunk([opening])
        dones: dict[int, DoneEvent] = {}
        started: set[int] = set()  # choices whose first event came (a completion's echo goes before it)
        while len(dones) < reply.n:
            ev = await events.get()
            failed = isinstance(ev, DoneEvent) and ev.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED)
            if ev.index not in started and not failed and (echo := reply.first(ev)) is not None:
                yield chunk([echo])
            started.add(ev.index)
            if isinstance(ev, TextEvent):
                if ev.token_id >= 0 and ev.index == 0:
                    self._timed(timing)
                for piece in reply.pieces(ev):
                    yield chunk([piece])
                continue
            if failed:
                msg = ev.error if ev.finish_reason is FinishReason.ERROR else CANCELLED
                yield json.dumps({"error": {"message": msg, "type": "server_error", "param": None, "code": None}})
                yield "[DONE]"
                return
            dones[ev.index] = ev
            reason = self._reason(ev)
            for piece in reply.closing(ev.index):  # a tool reply's held-back text and arguments
                yield chunk([piece])
            yield chunk([reply.last(ev.index, reason)])
        usage = self._usage([dones[i] for i in range(reply.n)])
        if include_usage:
            yield chunk([], usage=usage)
        yield "[DONE]"

    def _sse(self, gen, req):
        """Server-sent events of `gen`'s strings. The generation is cancelled when the response ends
        for any reason (even a client gone before the first event, when `gen` never started). On
        shutdown the stream gets the engine's grace to finish, then its error chunk and [DONE]."""
        import anyio
        from sse_starlette.sse import EventSourceResponse

        engine = self.engine

        class Response(EventSourceResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    if not req.all_done:
                        engine.cancel(req)

        async def data():
            async for d in gen:
                yield {"data": d}
        return Response(data(), ping=15, sep="\n", shutdown_event=anyio.Event(),
                        shutdown_grace_period=SHUTDOWN_GRACE + 1)

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        if request.path_params["name"] != self.name:
            raise ApiError(404, f"unknown model {request.path_params['name']!r}; this server runs {self.name!r}",
                           param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llamaexport",
                "context_length": self.engine.ctx}

    async def health(self, request):
        from starlette.responses import JSONResponse

        active, queued = self.engine.counts()
        if not self.engine.alive:
            return JSONResponse({"status": "unavailable", "error": self.engine.error or "shutting down",
                                 "active": active, "queued": queued}, status_code=503)
        return JSONResponse({"status": "ok", "active": active, "queued": queued})

    async def metrics(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(engine: Engine, *, model_name: str, chat_format: str = "auto", api_key: str | None = None):
    """The Starlette app for one engine (whose thread the caller starts)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    api = Api(engine, model_name=model_name, chat_format=chat_format, api_key=api_key)

    def endpoint(fn, name):
        async def wrapped(request):
            try:
                resp = await fn(request)
            except ApiError as e:
                resp = _error_response(e.status, e.message, param=e.param, code=e.code, type_=e.type,
                                       headers=e.headers)
            api.m_requests.labels(name, str(resp.status_code)).inc()
            return resp
        return wrapped

    routes = [Route("/v1/chat/completions", endpoint(api.chat, "chat"), methods=["POST"]),
              Route("/v1/completions", endpoint(api.completions, "completions"), methods=["POST"]),
              Route("/v1/models", endpoint(api.models, "models"), methods=["GET"]),
              Route("/v1/models/{name:path}", endpoint(api.model, "models"), methods=["GET"]),
              Route("/health", api.health, methods=["GET"]),
              Route("/metrics", endpoint(api.metrics, "metrics"), methods=["GET"])]

    async def http_error(request, exc: HTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error_response(exc.status_code, msg)

    async def server_error(request, exc: Exception):
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    class Auth:
        """Every endpoint but /health needs `Authorization: Bearer KEY` when a key is set."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and api_key and scope["path"] != "/health":
                headers = dict(scope["headers"])
                got = headers.get(b"authorization", b"").decode("latin-1")
                if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                    resp = _error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                           code="invalid_api_key")
                    return await resp(scope, receive, send)
            return await self.app(scope, receive, send)

    from starlette.middleware import Middleware

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                    middleware=[Middleware(Auth)])
    app.state.api = api
    return app


def _check_listen(host: str, port: int):
    """Fail now, with one line, if (host, port) cannot be listened on (uvicorn binds it again later, with
    SO_REUSEADDR as here)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise LlamaExportError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or "
                               "--host") from None


def serve(artifact, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 4, max_queue: int = 16,
          threads: int | None = None, api_key: str | None = None, prefill_chunk: int = 128,
          chat_format: str | None = None, model_name: str | None = None, backend: str | None = None,
          speculative=None):
    """Load the artifact and serve it until SIGTERM / Ctrl-C (then exit 0). speculative: the requests' default
    runtime.speculative.Speculation (None: off)."""
    _require_serve_deps()
    import uvicorn

    from llamaexport.model.chat import check_format, format_chat
    from llamaexport.runtime.llama_model import LlamaModel

    if not 1 <= port <= 65535:
        raise LlamaExportError(f"port must be 1 to 65535, got {port}")
    if chat_format is not None:
        check_format(chat_format)
    check_limits(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
    _check_listen(host, port)  # before the minutes a large model may take to load
    model = LlamaModel.load(artifact, threads=threads, backend=backend)
    model.require_tokenizer()
    fmt = chat_format or model.chat_format  # the manifest's, else auto
    try:
        format_chat([{"role": "user", "content": "hi"}], tokenizer=model.tokenizer, fmt=fmt)
    except LlamaExportError as e:
        print(f"warning: /v1/chat/completions will answer 400 ({e})", file=sys.stderr)
    try:  # llguidance's view of the vocabulary (0.1-0.8 s), built now so no request pays for it
        from llamaexport.runtime.constraint import constraint_tokenizer
        constraint_tokenizer(model.tokenizer, model.config.vocab_size)
    except LlamaExportError:
        pass  # without the structured extra, a request that asks for a grammar is told what to install
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    speculative=speculative)
    if engine.max_batch < max_batch:
        print(f"warning: the engine takes at most {engine.max_batch} sequences at once (its profiles' batch); "
              f"--max-batch {max_batch} lowered to {engine.max_batch}", file=sys.stderr)
    name = model_name or model.dir.resolve().name
    app = create_app(engine, model_name=name, chat_format=fmt, api_key=api_key)
    engine.start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # stop accepting, and give running generations a few seconds before cancelling them
            threading.Thread(target=engine.shutdown, args=(SHUTDOWN_GRACE,), daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(SHUTDOWN_GRACE) + 2, lifespan="off")
    server = Server(config)
    print(f"serving {model.dir} as {name!r} on http://{host}:{port}/v1 (backend {model.manifest.get('backend')}, "
          f"max batch {engine.max_batch}, queue {max_queue}, chat format {fmt}); Ctrl-C stops", file=sys.stderr,
          flush=True)
    # uvicorn re-raises the signal that stopped it once it is done, to whatever handler was there
    # before: these make that a clean exit 0 instead of death by SIGTERM / a KeyboardInterrupt
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except (OSError, SystemExit):  # uvicorn logs a bind failure and exits 1
        if server.started:
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.close()
        model.close()
    if not server.started:
        raise LlamaExportError(f"cannot listen on {host}:{port} (in use, or not an address of this machine); "
                               "pick another --port or --host")
    print("server stopped", file=sys.stderr)

