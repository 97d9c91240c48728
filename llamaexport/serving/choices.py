"""The `choices` of OpenAI's answers, written from the engine's events (runtime.scheduler.TextEvent and
DoneEvent): one per choice `index` (a request for n choices), a completion's echoed prompt, and logprobs in
OpenAI's two shapes:

    chat          choices[].logprobs = {"content": [{"token", "logprob", "bytes",
                                                     "top_logprobs": [{"token", "logprob", "bytes"}]}],
                                        "refusal": null}
    completions   choices[].logprobs = {"tokens": [str], "token_logprobs": [float],
                                        "top_logprobs": [{token: logprob}], "text_offset": [int]}

A chat reply in a tool-call format (`tool_format`: the request had tools) is parsed into `message.tool_calls`
(model.tool_parse: content null when the reply is only calls) with finish_reason "tool_calls"; streamed, a
ToolCallStream per choice turns its text into content and tool-call deltas (id and name first, then
argument fragments), so the deltas reassemble to the whole answer's calls.

A token is written as its own bytes (Tokenizer.token_bytes) decoded with errors="replace": a token holding
part of a UTF-8 character shows U+FFFD, and `bytes` (chat) has the raw bytes to join. A completion's
top_logprobs dict always holds the chosen token (OpenAI's "up to logprobs + 1" entries); with echo the
prompt's tokens come first, the first of them with a null logprob and null top_logprobs, and text_offset
counts characters from the start of the echoed prompt. Streamed, each chunk carries the logprobs of the
tokens whose text it brings (runtime.completion.Completion), so the chunks' lists concatenate to the
whole answer's.
"""

from __future__ import annotations

import dataclasses
import math

from llamaexport.model.tokenizer import StreamDecoder
from llamaexport.runtime.sampling import TokenLogprob

VERY_UNLIKELY = -9999.0  # OpenAI's logprob for a token too unlikely to say (a float32 log-softmax of -inf)


def prompt_offsets(tokenizer, ids: list[int]) -> list[int]:
    """Where each prompt id's text starts in the prompt's text (characters), decoded as a stream."""
    dec, offsets, at = StreamDecoder(tokenizer), [], 0
    for i in ids:
        offsets.append(at)
        at += len(dec.push(i))
    return offsets


@dataclasses.dataclass
class Reply:
    """How one request's choices are written: chat or text completion, n choices, logprobs, echo."""

    tokenizer: object
    chat: bool
    n: int = 1
    logprobs: bool = False         # report them (the engine computes them: Engine.submit(logprobs=...))
    echo: str | None = None        # completions: the prompt text each choice's text starts with
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # whose logprobs echo reports
    tool_format: str | None = None  # chat with tools: the call format the reply is parsed in (model.tools)
    _calls: dict = dataclasses.field(default_factory=dict)  # streamed: choice index -> its ToolCallStream

    def _stream(self, index: int):
        from llamaexport.model.tool_parse import ToolCallStream
        if index not in self._calls:
            self._calls[index] = ToolCallStream(self.tool_format)
        return self._calls[index]

    def token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def logprobs_of(self, lps: list[TokenLogprob] | None, prompt_lps=None, *, echo: bool = False) -> dict | None:
        """A choice's (or a chunk's) logprobs in the API's shape; None when the request did not ask. With
        `echo` (a completion's first chunk, or its whole answer), `prompt_lps` [None, TokenLogprob, ...]
        come first and the generated tokens' offsets count from the start of the echoed prompt."""
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [self._chat_entry(lp) for lp in lps or []], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if echo and prompt_lps is not None:
            for lp, tid, at in zip(prompt_lps, self.prompt_ids, prompt_offsets(self.tokenizer, self.prompt_ids)):
                self._completion_entry(out, tid, lp, at)
        base = len(self.echo) if self.echo is not None else 0
        for lp in lps or []:
            self._completion_entry(out, lp.token_id, lp, base + lp.offset)
        return out

    def _chat_entry(self, lp: TokenLogprob) -> dict:
        def entry(token_id, logprob):
            text, raw = self.token(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": raw}
        return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}

    def _completion_entry(self, out: dict, token_id: int, lp: TokenLogprob | None, offset: int):
        text = self.token(token_id)[0]
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        if lp is None:  # a prompt's first token: nothing before it to predict it
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            return
        out["token_logprobs"].append(_finite(lp.logprob))
        top = {}
        for i, v in lp.top:
            top.setdefault(self.token(i)[0], _finite(v))  # two ids of one text: the likelier one's
        top.setdefault(text, _finite(lp.logprob))
        out["top_logprobs"].append(top)

    # ------------------------------------------------------------------ whole answers
    def choice(self, done, reason: str) -> dict:
        """A non-streamed answer's choice from its DoneEvent."""
        lps = self.logprobs_of(done.logprobs, done.prompt_logprobs, echo=True)
        if self.chat and self.tool_format is not None:
            from llamaexport.model.tool_parse import parse_tool_calls
            parsed = parse_tool_calls(done.text, self.tool_format)
            message = {"role": "assistant", "content": parsed.content}
            if parsed.tool_calls:
                message["tool_calls"] = parsed.tool_calls
                reason = "tool_calls" if reason == "stop" else reason
            return {"index": done.index, "message": message, "logprobs": lps, "finish_reason": reason}
        if self.chat:
            return {"index": done.index, "message": {"role": "assistant", "content": done.text}, "logprobs": lps,
                    "finish_reason": reason}
        return {"index": done.index, "text": (self.echo or "") + done.text, "logprobs": lps, "finish_reason": reason}

    # ------------------------------------------------------------------ streamed chunks
    def opening(self) -> list[dict]:
        """The choices of a stream's first chunk: chat's assistant role, for every choice (none for completions)."""
        if not self.chat:
            return []
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    def first(self, ev) -> dict | None:
        """A completion's echo, sent before a choice's first text (with the prompt's logprobs); else None."""
        if self.chat or self.echo is None:
            return None
        return {"index": ev.index, "text": self.echo, "finish_reason": None,
                "logprobs": self.logprobs_of([], ev.prompt_logprobs, echo=True)}

    def pieces(self, ev) -> list[dict]:
        """A TextEvent's chunks: its piece (nothing when it brings neither text nor logprobs); a tool reply's
        content and tool-call deltas as the parser decides them (logprobs with the first)."""
        if self.tool_format is None or not self.chat:
            return [self.piece(ev)] if ev.text or ev.logprobs else []
        lps = self.logprobs_of(ev.logprobs)
        out = [{"index": ev.index, "delta": d, "logprobs": None, "finish_reason": None}
               for d in self._stream(ev.index).push(ev.text)] if ev.text else []
        if lps is not None and ev.logprobs:
            if not out:
                out.append({"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": None})
            out[0]["logprobs"] = lps
        return out

    def closing(self, index: int) -> list[dict]:
        """A tool reply's last deltas (text held back until the reply ended), before its finish_reason."""
        if self.tool_format is None or not self.chat:
            return []
        return [{"index": index, "delta": d, "logprobs": None, "finish_reason": None}
                for d in self._stream(index).finish()]

    def piece(self, ev) -> dict:
        """A TextEvent's text and the logprobs that came with it."""
        lps = self.logprobs_of(ev.logprobs)
        if self.chat:
            return {"index": ev.index, "delta": {"content": ev.text}, "logprobs": lps, "finish_reason": None}
        return {"index": ev.index, "text": ev.text, "logprobs": lps, "finish_reason": None}

    def last(self, index: int, reason: str) -> dict:
        """A choice's closing chunk: its finish_reason ("tool_calls" for a tool reply that made calls)."""
        if self.tool_format is not None and self.chat and reason == "stop" and self._stream(index).calls:
            reason = "tool_calls"
        if self.chat:
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}


def _finite(v: float) -> float:
    return v if math.isfinite(v) else VERY_UNLIKELY
