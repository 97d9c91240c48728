"""What a generation may ask (`check_generation`, `ContextTooLong`) and when it ends, with its text and the
logprobs of the tokens that text is made of: the one routine for EOS ids, stop strings and max_new_tokens,
shared by `LlamaModel.stream` (run, the Python API) and the serving engine's scheduler.

Finish reasons, one vocabulary (`FinishReason`):
  eos        the model sent an end-of-sequence id (not part of the text)
  stop       the text reached a stop string (the text is cut before it)
  length     max_new_tokens ids were generated (the runtime also caps it at the context)
  cancelled  the engine only: the client went away, or the server shut down
  error      the engine: the backend failed (DoneEvent.error says how); both: a grammar refused the token
             sampled under its own mask (cannot happen unless llguidance errs; Completion.error says why)
A constrained generation (a runtime.constraint.Constraint given to Completion) ends with stop as soon
as its grammar allows nothing but EOS (no forward spent on the EOS), and with length when max_new_tokens
comes first: text cut mid-JSON is never reported as complete.
OpenAI's API has two of them: `FinishReason.openai` maps eos and stop to "stop", length to "length"
(the server answers cancelled and error with an error instead).
"""

from __future__ import annotations

import enum

from llamaexport import LlamaExportError, whole_number
from llamaexport.model.tokenizer import TextStream
from llamaexport.runtime.sampling import MAX_TOP_LOGPROBS, TokenLogprob


class BadArgument(LlamaExportError):
    """A generation argument that cannot be; `param` names it (the API's field)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ContextTooLong(BadArgument):
    """The prompt, or the prompt plus max_new_tokens, does not fit the context. `param`: which of the
    two to change ("prompt" or "max_tokens")."""


def _argument(value, name: str, **bounds) -> int:
    try:
        return whole_number(value, name, **bounds)
    except LlamaExportError as e:
        raise BadArgument(str(e), name) from None


def check_generation(*, max_new_tokens=None, stop=(), prompt: str | None = None, prompt_tokens: int | None = None,
                     context: int | None = None, whole_reply: bool = False, n: int | None = None,
                     slots: int | None = None, logprobs: int | None = None):
    """The one validation of a generation request (sampling: SamplingConfig), for LlamaModel, the
    serving engine, the server and the CLI; each argument given is checked: the prompt text is UTF-8, a
    prompt of `prompt_tokens` ids is 1 .. context - 1 long, max_new_tokens is a whole number >= 1 and,
    with whole_reply (the engine, for the API's max_tokens), fits the context after the prompt
    (LlamaModel instead stops at the context), the stop strings are a list of non-empty strings (an empty
    one would stop at once), n (choices) is 1 .. `slots` (the engine's KV-cache slots: the choices decode
    side by side), logprobs (alternatives per token) 0 .. 20. A prompt or reply that does not fit raises
    ContextTooLong, whose `param` says which to change; a bad n or logprobs BadArgument."""
    if prompt is not None:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise LlamaExportError("the prompt is not valid UTF-8 text; pass it as UTF-8") from None
    if prompt_tokens is not None:
        if prompt_tokens == 0:
            raise LlamaExportError("empty prompt: give at least one token")
        if context is not None and prompt_tokens >= context:
            raise ContextTooLong(f"the prompt is {prompt_tokens} tokens but the artifact's context is {context}; "
                                 "shorten the prompt or rebuild with a larger --max-seq-len", "prompt")
    if max_new_tokens is not None:
        whole_number(max_new_tokens, "max_new_tokens")
        if whole_reply and prompt_tokens is not None and context is not None and prompt_tokens + max_new_tokens > context:
            raise ContextTooLong(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_new_tokens}) is more than "
                                 f"the model's context ({context}); ask for at most {context - prompt_tokens} tokens",
                                 "max_tokens")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise LlamaExportError(f"stop strings must be a list of non-empty strings, got {stop!r}")
    if n is not None and _argument(n, "n") > (slots or n):
        raise BadArgument(f"n={n} choices need {n} KV-cache slots at once, and this engine has {slots} "
                          f"(serve --max-batch {slots}); ask for at most {slots} or raise --max-batch", "n")
    if logprobs is not None:
        _argument(logprobs, "logprobs", at_least=0, at_most=MAX_TOP_LOGPROBS, note="alternatives per token")


class FinishReason(enum.StrEnum):
    EOS = "eos"
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"

    @property
    def openai(self) -> str:
        """The OpenAI API's finish_reason: "length", else "stop" (an EOS id or a stop string)."""
        return "length" if self is FinishReason.LENGTH else "stop"


def eos_set(tokenizer, eos_ids=None) -> frozenset[int]:
    """The ids that end a generation: `eos_ids` when given ([] = none), else the tokenizer's."""
    if eos_ids is None:
        eos_ids = tokenizer.eos_ids if tokenizer is not None else ()
    return frozenset(int(t) for t in eos_ids)


class Completion:
    """One generation's sampled ids -> its printable text and, once over, its finish reason.

    push() takes each id in order: an EOS id ends it (reason eos, no text); otherwise the id is
    detokenized (model.tokenizer.TextStream: text that could still grow into a stop string is held
    back until it cannot) and a stop string (reason stop) or the max_new_tokens-th id (reason length)
    ends it. finish() returns the text held back; `text` is the whole completion.

    A token's logprob, when given to push(), is kept with its text: it is released (take_logprobs) once
    that text starts to show, so a stream reports it with its text, and a token that a stop string cuts
    away (its text starting where the final text ends) is never reported. An EOS id is no text: its
    logprob is not reported either. `logprobs`: every one released, in order."""

    def __init__(self, tokenizer, *, prompt_ids, stop=(), eos_ids: frozenset[int], max_new_tokens: int,
                 constraint=None, skip_special: bool = True):
        """constraint: the row's runtime.constraint.Constraint; push() consumes each id into it (the one
        place that advances a grammar, for LlamaModel.stream and the engine). skip_special=False keeps
        special tokens' text (a tool-call format's markers, for its parser); EOS ids are never text."""
        self.stream = TextStream(tokenizer, context=prompt_ids, stop=stop, skip_special=skip_special)
        self.constraint = constraint
        self.error: str | None = None
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []  # every id pushed, the EOS that ended it included
        self.reason: FinishReason | None = None
        self.logprobs: list[TokenLogprob] = []  # released: their tokens' text is (or starts) in the shown text
        self._held: list[TokenLogprob] = []     # their tokens' text not shown yet
        self._taken = 0                         # logprobs[:_taken] were handed out by take_logprobs

    def push(self, token_id: int, logprob: TokenLogprob | None = None) -> str | None:
        """Add one sampled id (and its logprob, to report); returns the text now safe to show ("" while held
        back), or None for an EOS id."""
        self.token_ids.append(token_id)
        c = self.constraint
        if c is not None and token_id not in self.eos_ids and not c.consume(token_id):
            self.reason, self.error = FinishReason.ERROR, f"the grammar refused token {token_id}: {c.error}"
            return None
        if token_id in self.eos_ids:
            self.reason = FinishReason.EOS
            return None
        if logprob is not None:
            logprob.offset = len(self.stream.text)  # its text starts where the text so far ends
            self._held.append(logprob)
        piece = self.stream.push(token_id)
        if self.stream.stopped or (c is not None and c.stopped):
            self.reason = FinishReason.STOP
        elif len(self.token_ids) >= self.max_new_tokens:
            self.reason = FinishReason.LENGTH
        return piece

    def finish(self) -> str:
        """The text still held back (after any finish but a cancelled one)."""
        tail = self.stream.finish()
        # what is left shows now, but a stop string cut away the tokens starting where the text ends
        self._release(len(self.stream.text) if self.stream.stopped else None)
        return tail

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs released since the last call: those of the tokens whose text now shows."""
        self._release(self.stream.emitted)
        out, self._taken = self.logprobs[self._taken:], len(self.logprobs)
        return out

    def _release(self, upto: int | None):
        """Release the held logprobs whose text starts before `upto` (None: all of them)."""
        n = len(self._held) if upto is None else next((i for i, lp in enumerate(self._held) if lp.offset >= upto),
                                                       len(self._held))
        self.logprobs += self._held[:n]
        del self._held[:n]
        if self.stream.stopped:  # the text ends before the rest: cut away with the stop string
            self._held.clear()

    @property
    def text(self) -> str:
        return self.stream.text
