"""A reply in a tool-call format (see `model.tools`) read back as OpenAI content and `tool_calls`, whole
(`parse_tool_calls`) or one text delta at a time (`ToolCallStream`, OpenAI's streaming delta format).

Both run one state machine, `CallScanner`, so the streamed deltas of a reply reassemble to exactly what
the whole-text parse returns. What it reads, per format:

    hermes   text <tool_call> {call} </tool_call> [<tool_call> {call} </tool_call> ...] text
    mistral  text [TOOL_CALLS] [{call}, {call}, ...] text
    llama3   {call}; {call} ...   or   <|python_tag|>{call}   or, when the reply starts otherwise, text

where {call} is `{"name": "<name>", "arguments": <JSON>}` ("parameters" for llama3; blanks anywhere between
tokens). A call counts from the moment its name and the arguments key are read: its arguments are then
streamed as raw text fragments, and kept even when the reply is cut short (finish_reason "length"), as
OpenAI does. Text that breaks the pattern before that point, the marker included, is content. Content is
the text outside calls, without the blanks that separate it from a call or end the reply. Markers that are
special tokens must be in the text: decode a tool reply with special tokens kept.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

PYTHON_TAG, TOOL_CALL, TOOL_CALL_END, MISTRAL_CALLS = "<|python_tag|>", "<tool_call>", "</tool_call>", "[TOOL_CALLS]"
_BLANK = " \t\n\r"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_STRING_RUN = re.compile(r'[^"\\]+')
_PRIMITIVE = re.compile(r"[-+0-9.eEa-zA-Z]*")
_ARGS_KEYS = {"llama3": ("parameters", "arguments"), "hermes": ("arguments",), "mistral": ("arguments",)}
_OPENER = {"hermes": TOOL_CALL, "mistral": MISTRAL_CALLS, "llama3": None}
_OK, _PARTIAL, _FAIL = "ok", "partial", "fail"


@dataclasses.dataclass
class ToolReply:
    """A parsed reply: the text outside calls (None when there is none) and OpenAI `tool_calls`."""
    content: str | None
    tool_calls: list[dict]


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id: "call_" and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_calls(text: str, fmt: str, *, new_id=new_call_id) -> ToolReply:
    """`text` (a whole reply in call format `fmt`) as content and OpenAI tool_calls: {"id": new_id(),
    "type": "function", "function": {"name", "arguments": the raw JSON text of the arguments}}."""
    scanner = CallScanner(fmt)
    events = scanner.feed(text) + scanner.finish()
    content, calls = [], []
    for event in events:
        if event[0] == "content":
            content.append(event[1])
        elif event[0] == "call":
            calls.append({"id": new_id(), "type": "function", "function": {"name": event[2], "arguments": ""}})
        else:
            calls[event[1]]["function"]["arguments"] += event[2]
    return ToolReply("".join(content) or None, calls)


class ToolCallStream:
    """The streaming parser: `push(delta)` each piece of reply text as it is generated and send the deltas it
    returns (OpenAI chunk `delta` objects: {"content": str}, a call's first {"tool_calls": [{"index", "id",
    "type", "function": {"name", "arguments": ""}}]}, then {"tool_calls": [{"index", "function":
    {"arguments": fragment}}]}); `finish()` at the end of the reply. Text that may still turn into a marker
    or a call is held back until it is decided. `calls` counts the calls begun (finish_reason "tool_calls")."""

    def __init__(self, fmt: str, *, new_id=new_call_id):
        self._scanner = CallScanner(fmt)
        self._new_id = new_id

    @property
    def calls(self) -> int:
        return self._scanner.calls

    def push(self, text: str) -> list[dict]:
        return self._deltas(self._scanner.feed(text))

    def finish(self) -> list[dict]:
        return self._deltas(self._scanner.finish())

    def _deltas(self, events) -> list[dict]:
        out = []
        for event in events:
            if event[0] == "content":
                if out and "content" in out[-1]:
                    out[-1]["content"] += event[1]
                else:
                    out.append({"content": event[1]})
            elif event[0] == "call":
                out.append({"tool_calls": [{"index": event[1], "id": self._new_id(), "type": "function",
                                            "function": {"name": event[2], "arguments": ""}}]})
            else:
                last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
                if last is not None and last["index"] == event[1]:
                    last["function"]["arguments"] += event[2]
                else:
                    out.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
        return out


class CallScanner:
    """The state machine both parsers run. `feed(text)` appends text and returns the events it decides:
    ("content", text), ("call", index, name), ("args", index, fragment); `finish()` decides the rest.

    States: "start" (llama3: blanks before the first character), "text" (looking for the opener), "array"
    (mistral: before "["), "call" (before a call's header), "args" (inside the arguments value), "close"
    (before the call's "}"), "members" (other members after the arguments), "next" (after a call: its end
    marker or a separator), "rest" (content to the end).
    """

    def __init__(self, fmt: str):
        if fmt not in _OPENER:
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self.fmt, self.keys, self.opener = fmt, _ARGS_KEYS[fmt], _OPENER[fmt]
        self.buf, self.pos, self.mark = "", 0, 0  # buf[:pos] is decided; mark: where the current call began
        self.state = "start" if fmt == "llama3" else "text"
        self.calls = 0
        self.after_call = False  # the text being read follows a call: its leading blanks are dropped
        self._value = None

    def feed(self, text: str) -> list:
        self.buf += text
        events = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list:
        events = self.feed("")
        rest = self.buf[self.pos:]
        if self.state in ("text", "rest", "start"):
            self._content(events, rest.rstrip())
        elif self.state in ("call", "array"):  # a call cut short before its name: all of it is text
            self._content(events, self.buf[self.mark:].rstrip())
        self.pos = len(self.buf)
        return events

    def _content(self, events, text):
        if self.after_call:
            text = text.lstrip(_BLANK)
            self.after_call = not text
        if text:
            events.append(("content", text))

    def _step(self, events) -> bool:
        """Advance once; False when more text is needed (or the state is final for now)."""
        return getattr(self, "_" + self.state)(events)

    def _start(self, events) -> bool:  # llama3: a call when the first non-blank is "{" or <|python_tag|>
        i = _skip(self.buf, self.pos)
        rest = self.buf[i:]
        if rest.startswith(PYTHON_TAG):
            self.mark, self.pos, self.state = self.pos, i + len(PYTHON_TAG), "call"
        elif rest.startswith("{"):
            self.mark, self.pos, self.state = self.pos, i, "call"
        elif not rest or PYTHON_TAG.startswith(rest):
            return False
        else:
            self.state = "rest"
        return True

    def _text(self, events) -> bool:
        j = self.buf.find(self.opener, self.pos)
        if j >= 0:
            self._content(events, self.buf[self.pos:j].rstrip(_BLANK))
            self.mark, self.pos = j, j + len(self.opener)
            self.state = "array" if self.fmt == "mistral" else "call"
            return True
        end = len(self.buf) - _marker_tail(self.buf, self.pos, self.opener)
        self._emit_until(events, end)
        return False

    def _rest(self, events) -> bool:
        self._emit_until(events, len(self.buf))
        return False

    def _emit_until(self, events, end):
        """Content up to `end`, less its trailing blanks (they are sent once text follows them)."""
        end = max(self.pos, len(self.buf[:end].rstrip(_BLANK)))
        if self.after_call:  # blanks after a call are dropped, and they decide nothing
            self.pos = _skip(self.buf, self.pos, end)
        self._content(events, self.buf[self.pos:end])
        self.pos = end

    def _array(self, events) -> bool:
        i = _skip(self.buf, self.pos)
        if i == len(self.buf):
            return False
        if self.buf[i] != "[":
            return self._fail()
        self.pos, self.state = i + 1, "call"
        return True

    def _call(self, events) -> bool:
        status, name, end = _header(self.buf, self.pos, self.keys)
        if status == _PARTIAL:
            return False
        if status == _FAIL:
            return self._fail()
        events.append(("call", self.calls, name))
        self.calls += 1
        self.pos, self.state, self._value = end, "args", _ValueScan()
        return True

    def _args(self, events) -> bool:
        end, done = self._value.advance(self.buf, self.pos)
        if end > self.pos:
            events.append(("args", self.calls - 1, self.buf[self.pos:end]))
        self.pos = end
        if done:
            self.state = "close"
        return done

    def _close(self, events) -> bool:
        i = _skip(self.buf, self.pos)
        if i == len(self.buf):
            return False
        if self.buf[i] == ",":  # more members after the arguments (an "id", say): skipped to the call's "}"
            self._value = _ValueScan(inside=True)
            self.pos, self.state = i + 1, "members"
        elif self.buf[i] == "}":
            self.pos, self.state = i + 1, "next"
        else:
            self.pos, self.state, self.after_call = i, "rest", True
        return True

    def _members(self, events) -> bool:
        self.pos, done = self._value.advance(self.buf, self.pos)
        if done:
            self.state = "next"
        return done

    def _next(self, events) -> bool:
        i = _skip(self.buf, self.pos)
        rest = self.buf[i:]
        expected = {"hermes": (TOOL_CALL_END,), "mistral": (",", "]"), "llama3": (";",)}[self.fmt]
        hit = next((e for e in expected if rest.startswith(e)), None)
        if hit is None and (not rest or any(e.startswith(rest) for e in expected)):
            return False  # blanks or a marker's beginning so far
        self.after_call = True
        if hit is None:  # something else follows the call: text to the end
            self.pos, self.state = i, "rest"
        elif hit in (",", ";"):
            self.mark, self.pos, self.state, self.after_call = i, i + 1, "call", False
        else:  # </tool_call> (more calls may follow) or the array's "]"
            self.pos, self.state = i + len(hit), "text" if hit == TOOL_CALL_END else "rest"
        return True

    def _fail(self) -> bool:
        """The text since the call began is not a call: it is content, and so is everything after it."""
        self.pos, self.state = self.mark, "rest"
        return True


def _skip(s: str, i: int, end: int | None = None) -> int:
    end = len(s) if end is None else end
    while i < end and s[i] in _BLANK:
        i += 1
    return i


def _marker_tail(s: str, start: int, marker: str | None) -> int:
    """Length of the longest end of s[start:] that is a proper beginning of `marker` (held back: it may
    still become the marker)."""
    if not marker:
        return 0
    for k in range(min(len(marker) - 1, len(s) - start), 0, -1):
        if s.endswith(marker[:k]):
            return k
    return 0


def _header(s: str, i: int, keys) -> tuple:
    """Match `{"name": "<name>", "<key>": ` at s[i], blanks allowed between tokens and before the value:
    (_OK, name, index of the value), (_PARTIAL, ...) while s ends inside a possible match, or (_FAIL, ...)."""
    name = None
    for step in ("{", '"name"', ":", "NAME", ",", "KEY", ":"):
        i = _skip(s, i)
        if i == len(s):
            return _PARTIAL, None, None
        if step == "NAME":
            if s[i] != '"':
                return _FAIL, None, None
            m = _STRING.match(s, i)
            if m is None:
                return _PARTIAL, None, None
            name, i = json.loads(m.group()), m.end()
            continue
        options = [f'"{k}"' for k in keys] if step == "KEY" else [step]
        hit = next((o for o in options if s.startswith(o, i)), None)
        if hit is None:
            return (_PARTIAL if any(o.startswith(s[i:]) for o in options) else _FAIL), None, None
        i += len(hit)
    i = _skip(s, i)
    return (_PARTIAL, None, None) if i == len(s) else (_OK, name, i)


class _ValueScan:
    """Where a JSON value ends, found a chunk at a time: strings, escapes and nesting are tracked, nothing
    is validated (the grammar did that)."""

    def __init__(self, *, inside: bool = False):
        """inside: the scan starts within an object (depth 1) and ends at its closing brace."""
        self.depth, self.in_string, self.escaped = int(inside), False, False
        self.kind = "nested" if inside else None

    def advance(self, s: str, i: int) -> tuple[int, bool]:
        """Scan s from i: (index just past the value, True) once it ends, else (len(s), False)."""
        n = len(s)
        if self.kind is None and i < n:
            c = s[i]
            self.kind = "primitive" if c not in '{["' else "string" if c == '"' else "nested"
            self.depth, self.in_string, i = (1, False, i + 1) if c in "{[" else (0, c == '"', i + 1 if c == '"' else i)
        if self.kind == "primitive":
            end = _PRIMITIVE.match(s, i).end()
            return end, end < n
        while i < n:
            if self.in_string:
                if self.escaped:  # the character after a backslash, whatever it is
                    self.escaped, i = False, i + 1
                    continue
                m = _STRING_RUN.match(s, i)
                if m:
                    i = m.end()
                    continue
                c, i = s[i], i + 1
                if c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i, True
                continue
            c, i = s[i], i + 1
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i, True
        return n, False
