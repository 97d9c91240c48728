"""`llamaexport chat DIR`: an interactive multi-turn chat on the serving engine.

One engine slot holds the conversation's KV cache, so each turn prefills only what is new (the
engine's prefix reuse). Ctrl-C stops the answer being written (the conversation goes on with
what was said); Ctrl-D or /exit ends the program.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from llamaexport import LlamaExportError
from llamaexport.model.chat import default_stop_strings, format_chat
from llamaexport.runtime.completion import FinishReason
from llamaexport.runtime.engine import DoneEvent, Engine
from llamaexport.runtime.sampling import SamplingConfig

HELP = """commands:
  /reset         forget the conversation
  /system TEXT   set the system prompt (empty: none) and start over
  /stats         tokens, speed and time to first token of the last answer, and totals
  /help          this text
  /exit          quit (or Ctrl-D); Ctrl-C stops an answer"""


class Chat:
    """The conversation state and one turn at a time; `main` wires it to a terminal."""

    def __init__(self, model, *, fmt: str | None = None, system: str | None = None,
                 sampling: SamplingConfig | None = None, max_new_tokens: int = 512, grammar=None, speculative=None):
        """grammar: a compiled runtime.constraint.Grammar every answer follows (chat --json-schema ...);
        speculative: a runtime.speculative.Speculation for every answer (chat --speculative)."""
        fmt = fmt or model.chat_format  # None: the one recorded at build, else auto
        self.model, self.fmt, self.system = model, fmt, system
        self.sampling = sampling or SamplingConfig()
        self.max_new_tokens = max_new_tokens
        self.grammar = grammar
        self.engine = Engine(model, max_batch=1, max_queue=0, speculative=speculative)
        self.stop = default_stop_strings(fmt)
        format_chat([{"role": "user", "content": "x"}], tokenizer=model.tokenizer, fmt=fmt)  # the format works here
        self.history: list[dict] = []
        self.last: dict | None = None
        self.total = {"turns": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0}
        self.interrupt = threading.Event()

    def reset(self):
        self.history = []

    def _prompt_ids(self) -> list[int]:
        """The conversation as token ids, dropping the oldest turns if it outgrows the context."""
        ctx = self.model.config.max_seq_len
        while True:
            ids = self.model.encode(format_chat(self.history, tokenizer=self.model.tokenizer, fmt=self.fmt,
                                                system=self.system))
            if len(ids) < ctx - 1 or len(self.history) <= 1:
                break
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]
        if len(ids) >= ctx - 1:
            self.history.pop()
            raise LlamaExportError(f"that message is {len(ids)} tokens with the template; the context is {ctx}")
        return ids

    def turn(self, text: str, write=None):
        """Answer one user message, passing text pieces to `write`; returns the answer."""
        self.history.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        ctx = self.model.config.max_seq_len
        self.interrupt.clear()
        t0 = time.perf_counter()
        first = None
        done = None
        pieces = []
        stream = self.engine.stream(ids, max_new_tokens=min(self.max_new_tokens, ctx - len(ids)),
                                    sampling=self.sampling, stop=self.stop, grammar=self.grammar)
        try:
            for ev in stream:
                if isinstance(ev, DoneEvent):
                    done = ev
                    break
                if first is None:
                    first = time.perf_counter()
                if ev.text:
                    pieces.append(ev.text)
                    if write:
                        write(ev.text)
                if self.interrupt.is_set():
                    break
        finally:
            stream.close()  # cancels an interrupted answer and frees the slot
        if done is not None and done.finish_reason is FinishReason.ERROR:
            self.history.pop()  # the turn did not happen
            raise LlamaExportError(f"the model failed on this message ({done.error}); try again or /reset")
        answer = "".join(pieces)
        self.history.append({"role": "assistant", "content": answer})
        end = time.perf_counter()
        n = done.completion_tokens if done else len(pieces)
        self.last = {"prompt_tokens": len(ids), "cached_tokens": done.cached_tokens if done else None,
                     "generated_tokens": n, "ttft_s": (first or end) - t0,
                     "tok_s": (n - 1) / (end - first) if first and n > 1 and end > first else None,
                     "interrupted": done is None}
        self.total["turns"] += 1
        self.total["prompt_tokens"] += len(ids)
        self.total["cached_tokens"] += self.last["cached_tokens"] or 0
        self.total["generated_tokens"] += n
        return answer

    def stats(self) -> str:
        if self.last is None:
            return "no answer yet"
        s = self.last
        speed = f"{s['tok_s']:.1f} tok/s" if s["tok_s"] else "n/a tok/s"
        cached = "?" if s["cached_tokens"] is None else s["cached_tokens"]
        t = self.total
        return (f"last answer: {s['generated_tokens']} tokens, {speed}, time to first token {s['ttft_s'] * 1000:.0f} ms, "
                f"prompt {s['prompt_tokens']} tokens ({cached} reused from the cache)"
                f"{', interrupted' if s['interrupted'] else ''}\n"
                f"conversation: {t['turns']} turns, {t['prompt_tokens']} prompt tokens ({t['cached_tokens']} reused), "
                f"{t['generated_tokens']} generated")

    def close(self):
        self.engine.close()


def main(model, *, fmt=None, system=None, sampling=None, max_new_tokens=512, stdin=None, stdout=None, grammar=None,
         speculative=None):
    """The REPL on a terminal (or any text streams)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    chat = Chat(model, fmt=fmt, system=system, sampling=sampling, max_new_tokens=max_new_tokens, grammar=grammar,
                speculative=speculative)
    tty = stdin.isatty()
    out = stdout.write

    def ask() -> str | None:
        if tty:
            try:
                return input(">>> ")
            except EOFError:
                return None
        out(">>> ")
        stdout.flush()
        line = stdin.readline()
        return None if line == "" else line.rstrip("\n")

    out(f"chatting with {model.dir.name} ({chat.fmt} format); /help for commands, Ctrl-D to quit\n")
    try:
        while True:
            try:
                line = ask()
            except KeyboardInterrupt:  # at the prompt: a fresh line, not an exit
                out("\n")
                continue
            if line is None:
                out("\n")
                return
            cmd, _, arg = line.strip().partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/reset":
                chat.reset()
                out("(conversation cleared)\n")
            elif cmd == "/system":
                chat.system = arg.strip() or None
                chat.reset()
                out(f"(system prompt {'set' if chat.system else 'cleared'}; conversation cleared)\n")
            elif cmd == "/stats":
                out(chat.stats() + "\n")
            elif cmd == "/help":
                out(HELP + "\n")
            elif cmd.startswith("/"):
                out(f"unknown command {cmd}; /help lists them\n")
            elif line.strip():
                previous = signal.signal(signal.SIGINT, lambda *_: chat.interrupt.set())
                try:
                    chat.turn(line, write=lambda t: (out(t), stdout.flush()))
                except LlamaExportError as e:
                    out(f"error: {e}\n")
                finally:
                    signal.signal(signal.SIGINT, previous)
                out("\n" if not chat.interrupt.is_set() else "\n(stopped)\n")
            stdout.flush()
    finally:
        chat.close()
