"""Constrained decoding: a per-row token mask from llguidance, so a row generates only text its grammar
accepts (a JSON schema, any JSON object, a regex, a Lark or GBNF grammar, a tool-call format).

The pieces, in the order a request meets them:

    g = compile_constraint({"type": "json_schema", "json_schema": {...}}, tok, n_vocab=cfg.vocab_size)
    row = Constraint(g)                      # one per sequence; row.fork() for the n>1 siblings of a prompt
    fill_masks([row, ...])                   # next-token masks of several rows; releases the GIL, so it can
                                             # run on a MaskWorker thread while the forward runs
    apply_masks(logits, [row, None, ...])    # logits [B, V] in place; unconstrained (None) rows untouched
    row.consume(token)                       # after sampling; row.stopped: only EOS can follow (finish now)

`compile_constraint` validates everything before a request is queued and raises BadConstraint naming
the failing part (`response_format.json_schema.schema at /properties/n: Invalid type: integr`). EOS is
allowed only where the grammar accepts; the model's padded vocabulary rows never are. llguidance is
imported on first use; without it, asking for a constraint says which extra to install.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from llamaexport import LlamaExportError, whole_number
from llamaexport.model.schema import json_layout, strict_schema, subschemas
from llamaexport.model.tokenizer import HFTokenizer, SentencePieceTokenizer
from llamaexport.model.tools import MARKERS, tool_grammar

_INSTALL = "structured output and tool calls need llguidance: pip install 'llamaexport[structured]'"
KINDS = ("text", "json_object", "json_schema", "regex", "lark", "gbnf")
_PARAM = {"json_object": "response_format", "json_schema": "response_format", "regex": "regex", "lark": "grammar",
          "gbnf": "grammar"}
NEG_INF = np.float32(-np.inf)
_EXCERPT = re.compile(r"^\s*(\d+ \|.*|\^+)\s*$")  # llguidance's source excerpt lines under a Lark error


class BadConstraint(LlamaExportError):
    """A constraint that cannot be compiled. The message names the failing part (a schema path like
    `/properties/n`, a grammar position); `param` is the request field it came from."""

    def __init__(self, message: str, *, param: str):
        super().__init__(message)
        self.param = param


def llguidance():
    """The llguidance module, or the LlamaExportError that names the extra to install."""
    try:
        import llguidance as llg
    except ImportError:
        raise LlamaExportError(_INSTALL) from None
    return llg


def mask_words(n_vocab: int) -> int:
    """int32 words in one row's bitmask: bit i of word w is token 32*w + i."""
    return (n_vocab + 31) // 32


# --- the tokenizer bridge -------------------------------------------------------------------------

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> {n_vocab: LLTokenizer}
_TOKENIZERS_LOCK = threading.Lock()


def constraint_tokenizer(tokenizer, n_vocab: int | None = None):
    """The llguidance tokenizer of a llamaexport Tokenizer (HF tokenizers or sentencepiece; a GGUF's
    vocabulary is one of them), built once per (tokenizer, n_vocab) and cached: 0.1-0.8 s.

    n_vocab: the model's vocabulary size (its logits' width, default the tokenizer's); masks are that wide
    and ids past the tokenizer's own are never allowed. EOS is every id of `tokenizer.eos_ids` (all the
    end-of-turn tokens): the mask allows them exactly where the grammar accepts.
    """
    n = tokenizer.vocab_size if n_vocab is None else whole_number(n_vocab, "n_vocab")
    if n < tokenizer.vocab_size:
        raise LlamaExportError(f"n_vocab {n} is smaller than the tokenizer's {tokenizer.vocab_size} tokens; "
                               "pass the model's vocab_size")
    with _TOKENIZERS_LOCK:
        per_size = _TOKENIZERS.setdefault(tokenizer, {})
        if n not in per_size:
            per_size[n] = _lltokenizer(tokenizer, n)
        return per_size[n]


def _lltokenizer(tokenizer, n_vocab):
    llg = llguidance()
    eos = list(tokenizer.eos_ids) or None
    if isinstance(tokenizer, HFTokenizer):
        # llguidance.hf would import transformers; the tokenizer.json text is all it passes on
        return llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=eos)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return llg.LLTokenizer(llg.TokenizerWrapper(_SentencePieceVocab(tokenizer, n_vocab)), eos_token=eos)
    raise LlamaExportError(f"constrained decoding needs an HF or sentencepiece tokenizer, not {type(tokenizer).__name__}")


class _SentencePieceVocab:
    """What llguidance.TokenizerWrapper reads from a sentencepiece model: the bytes of every id, the special
    ids (control, unknown and unused pieces), EOS/BOS, and an encoder for text fragments. LLTokenizer ignores
    n_vocab for a wrapper, so the ids past the model's pieces (a padded embedding) are listed here, as
    special tokens no grammar text can produce."""

    def __init__(self, tokenizer: SentencePieceTokenizer, n_vocab: int):
        sp = tokenizer.processor
        self.tokens, self.special_token_ids = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):  # <0x0A> -> b"\n"
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                self.tokens.append(piece.encode())
                self.special_token_ids.append(i)
            else:  # "▁" is the space; user-defined pieces are their text
                self.tokens.append(piece.replace("\u2581", " ").encode())
        for i in range(sp.get_piece_size(), n_vocab):
            self.tokens.append(f"<[padding {i}]>".encode())
            self.special_token_ids.append(i)
        self.eos_token_id = tokenizer.eos_ids[0] if tokenizer.eos_ids else max(sp.eos_id(), 0)
        self.bos_token_id = tokenizer.bos_id
        self._sp = _without_dummy_prefix(sp)

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._sp.encode(text)


def _without_dummy_prefix(sp):
    """A copy of the processor that does not put "▁" before the text: llguidance encodes fragments (text a
    grammar forces mid-sentence), which must not gain a leading space."""
    import sentencepiece

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # the generated module needs protobuf
        raise LlamaExportError(_INSTALL) from None
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


def special_markers(tokenizer, markers, *, n_vocab: int | None = None) -> dict[str, int]:
    """{marker: id} for the markers that are one special token in this vocabulary (to be named `<[id]>` in
    a grammar); markers spelled with ordinary tokens are left out (a grammar writes them as text)."""
    lltok = constraint_tokenizer(tokenizer, n_vocab)
    out = {}
    for m in markers:
        ids = tokenizer.encode(m, add_bos=False)
        if len(ids) == 1 and lltok.is_special_token(ids[0]):
            out[m] = ids[0]
    return out


# --- compiling ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled, validated grammar for one tokenizer and vocabulary width. Immutable: every row that
    follows it (the n choices of a request, later requests with the same spec) shares it."""
    text: str            # llguidance's grammar (Lark, or its JSON form)
    kind: str            # the spec's type
    lltokenizer: object  # llguidance.LLTokenizer
    n_vocab: int
    warnings: tuple[str, ...] = ()  # what a lenient schema ignored (unknown keywords and formats)


def compile_constraint(spec: dict, tokenizer, *, n_vocab: int | None = None, param: str | None = None,
                       max_whitespace: int = 0) -> Grammar | None:
    """Compile and validate a constraint spec; None for {"type": "text"} (no constraint).

    spec: {"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    (strict: objects refuse undeclared keys, as OpenAI's strict mode, and unsupported keywords are errors;
    not strict: unsupported keywords and formats are ignored) | {"type": "regex", "regex": str} |
    {"type": "gbnf", "gbnf": str} (GBNF, or Lark passed through) | {"type": "lark", "lark": str,
    "schemas": {part: schema}} (a raw grammar, e.g. a tool grammar; `schemas` only name the part at fault).
    JSON is compact (see `json_layout`; `max_whitespace` allows bounded blanks). Raises BadConstraint,
    with `param` (default: the field the kind comes from) naming the request field, before anything runs.
    """
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in KINDS:
        raise BadConstraint(f"{param or 'response_format'}.type must be one of {', '.join(KINDS)}, got {kind!r}",
                            param=param or "response_format")
    if kind == "text":
        return None
    param = param or _PARAM[kind]
    llg = llguidance()
    lltok = constraint_tokenizer(tokenizer, n_vocab)
    text, options = _grammar_text(llg, kind, spec, json_layout(max_whitespace), param)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, lltok)
    if is_error:
        raise BadConstraint(_locate(llg, kind, spec, lltok, options, param, messages[0]), param=param)
    return Grammar(text, kind, lltok, lltok.vocab_size, tuple(messages))  # vocab_size: the n_vocab asked for


def compile_tools(tools, tool_choice, tokenizer, *, fmt: str, n_vocab: int | None = None, parallel: bool = True,
                  max_whitespace: int = 0) -> Grammar | None:
    """The grammar of a reply in tool-call format `fmt` (see `model.tools.tool_grammar`), with the format's
    markers named by id where they are special tokens; None when no call can be made (tool_choice "none")."""
    special = special_markers(tokenizer, MARKERS[fmt], n_vocab=n_vocab)
    g = tool_grammar(tools, tool_choice, fmt=fmt, special=special, parallel=parallel, max_whitespace=max_whitespace)
    if g is None:
        return None
    return compile_constraint({"type": "lark", "lark": g.lark, "schemas": g.schemas}, tokenizer, n_vocab=n_vocab,
                              param="tools")


def _grammar_text(llg, kind, spec, layout, param) -> tuple[str, dict | None]:
    """(llguidance grammar text, the JSON options a schema was compiled with); BadConstraint on bad input."""
    M = llg.LLMatcher
    if kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"}, overrides=layout), layout
    if kind == "json_schema":
        js = spec.get("json_schema")
        schema = js.get("schema", {"type": "object"}) if isinstance(js, dict) else None
        if not isinstance(schema, dict):
            raise BadConstraint(f"{param}.json_schema must be an object whose 'schema' is a JSON Schema object",
                                param=param)
        strict = js.get("strict") is True
        options = {**layout, "lenient": not strict}
        return M.grammar_from_json_schema(strict_schema(schema) if strict else schema, overrides=options), options
    source = spec.get(kind)
    if not isinstance(source, str):
        raise BadConstraint(f"{param} must be a string ({kind})", param=param)
    if kind == "regex":
        return M.grammar_from_regex(source), None
    if kind == "lark":
        return M.grammar_from_lark(source), None
    try:
        return llg.grammar_from("gbnf", source), None
    except ValueError as e:  # the GBNF -> Lark conversion failed
        raise BadConstraint(f"{param}: {_one_line(str(e))}", param=param) from None


def _locate(llg, kind, spec, lltok, options, param, message) -> str:
    """The error message, naming the part at fault: the deepest sub-schema that fails on its own."""
    if kind == "json_schema":
        js = spec["json_schema"]
        schema = js.get("schema", {"type": "object"})
        found = _schema_error(llg, strict_schema(schema) if js.get("strict") is True else schema, lltok, options)
        if found:
            return f"{param}.json_schema.schema at {found[0]}: {found[1]}"
    for part, schema in (spec.get("schemas") or {}).items() if kind == "lark" else ():
        found = _schema_error(llg, schema, lltok, None)  # tool schemas carry their options (x-guidance)
        if found:
            return f"{part} at {found[0]}: {found[1]}"
    message = _one_line(message)
    if kind == "regex":
        message = re.sub(r"^at \d+\(\d+\): ", "", message)  # the position is in llguidance's wrapper grammar
    return f"{param}: {message}"


def _schema_error(llg, schema, lltok, options) -> tuple[str, str] | None:
    """(JSON pointer, message) of the deepest sub-schema of `schema` that fails to compile on its own (the
    root's $defs carried along so $refs resolve), or None when `schema` compiles. Error path only."""
    options = options if options is not None else schema.get("x-guidance")  # a tool schema carries its own

    def check(s):
        try:
            g = llg.LLMatcher.grammar_from_json_schema(s, overrides=options)
        except ValueError as e:
            return str(e)
        return llg.LLMatcher.validate_grammar(g, lltok) or None

    message = check(schema)
    if message is None:
        return None
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    path, node, seen = "", schema, set()
    while path not in seen:
        seen.add(path)
        kids = subschemas(node, path)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):  # a local $ref: what fails is what it points at
            kids.append((ref[1:], _pointer(schema, ref[1:])))
        for child_path, child in kids:
            child_message = check({**defs, **child}) if isinstance(child, dict) else None
            if child_message is not None:
                path, node, message = child_path, child, child_message
                break
        else:
            break
    return path or "/", _one_line(message)


def _pointer(doc, pointer: str):
    """The value at JSON pointer `pointer` ("/$defs/p") in `doc`, or None."""
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    return doc


def _one_line(message: str) -> str:
    """llguidance's message on one line: the source excerpt under a Lark error dropped, blanks collapsed."""
    kept = [line for line in message.splitlines() if line.strip() and not _EXCERPT.match(line)]
    text = " ".join(" ".join(kept).split())
    return re.sub(r"^failed to compile JSON schema: ", "", text)[:500]


# --- one row's state ------------------------------------------------------------------------------


class Constraint:
    """One sequence's place in its grammar (an llguidance matcher) and the mask of its next token.

    Use it from one thread at a time: a MaskWorker thread fills the mask, then the engine thread applies
    it and consumes the sampled token.
    """

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self._m = llguidance().LLMatcher(grammar.lltokenizer, grammar.text, log_level=0)  # 0.5-1 ms
        self.mask = np.zeros(mask_words(grammar.n_vocab), np.int32)  # [W]: bit i of word w = token 32w+i
        self._refused = np.empty_like(self.mask)  # [W] scratch for apply: the mask's complement
        self._fresh = False  # the mask is for the current position

    def fill_mask(self) -> np.ndarray:
        """Compute the next token's mask into `self.mask` (GIL released) and return it."""
        self._m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        self._fresh = True
        return self.mask

    def consume(self, token: int) -> bool:
        """Advance past `token` (EOS included); False when the grammar refuses it, which leaves the row
        in an error state for good (`error` says why)."""
        self._fresh = False
        return self._m.consume_token(int(token))

    def allowed(self) -> np.ndarray:
        """The ids the last mask allows (sorted), for tests and debugging."""
        self._check_fresh()
        bits = np.unpackbits(self.mask.view(np.uint8), count=self.grammar.n_vocab, bitorder="little")
        return np.flatnonzero(bits)

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (EOS is allowed)."""
        return self._m.is_accepting()

    @property
    def stopped(self) -> bool:
        """Nothing but EOS can follow (or the row is in error): finish the row now with "stop"."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()

    def rollback(self, n: int) -> None:
        """Undo the last `n` consumed tokens (speculative decoding's rejected draft)."""
        self._fresh = False
        if not self._m.rollback(whole_number(n, "n", at_least=0)):
            raise LlamaExportError(f"cannot roll the constraint back {n} tokens: {self.error or 'too far'}")

    def valid_prefix(self, tokens) -> int:
        """How many of `tokens` (a draft) the grammar accepts in a row from here; the state is unchanged."""
        return self._m.validate_tokens([int(t) for t in tokens])

    def fork(self) -> Constraint:
        """An independent copy at the same position (5 us; the n>1 choices of one prompt)."""
        twin = object.__new__(Constraint)
        twin.grammar, twin._m, twin._fresh = self.grammar, self._m.deep_copy(), self._fresh
        twin.mask, twin._refused = self.mask.copy(), np.empty_like(self.mask)
        return twin

    def apply(self, row: np.ndarray) -> None:
        """Set the logits of the tokens the grammar refuses next to -inf, in place. row: [V'] float32,
        V' >= n_vocab (ids from n_vocab on are refused too). Needs the mask of the current position.

        No float temporaries: the only allocation is the one-byte-per-id unpack (V bytes, under glibc's
        mmap threshold), which measured faster than unpacking into preallocated scratch through a lookup
        table (5 vs 12 us at V=49k). 20-40 us per row on structured masks."""
        self._check_fresh()
        V = self.grammar.n_vocab
        if row.shape[-1] < V:
            raise ValueError(f"logits row has {row.shape[-1]} entries, the constraint's vocabulary {V}")
        np.invert(self.mask, out=self._refused)
        # [V] bool; the int32 words are little-endian, so their bytes' bits in little order are the ids in order
        refused = np.unpackbits(self._refused.view(np.uint8), count=V, bitorder="little").view(bool)
        head = row[:V]
        n_allowed = V - np.count_nonzero(refused)
        if n_allowed < V // 16:  # few allowed (JSON punctuation, forced text): keep those, fill the rest
            # an errored matcher allows nothing: then EOS is kept, so the row ends (`error` says why)
            keep = np.flatnonzero(~refused) if n_allowed else np.asarray(self.grammar.lltokenizer.eos_tokens, np.int64)
            vals = head[keep]
            head.fill(NEG_INF)
            head[keep] = vals
        else:
            np.copyto(head, NEG_INF, where=refused)
        row[V:] = NEG_INF

    def _check_fresh(self):
        if not self._fresh:
            raise RuntimeError("the constraint's mask is stale: fill_mask() after each consume()/rollback()")


# --- batches --------------------------------------------------------------------------------------

_EXECUTOR = None
_EXECUTOR_LOCK = threading.Lock()


def _default_executor():
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance().LLExecutor()  # llguidance's default: 80% of the cores, at most 32
        return _EXECUTOR


def fill_masks(constraints, *, executor=None) -> None:
    """Fill the next-token masks of several rows (None entries skipped) in one call, which runs on
    llguidance's threads with the GIL released: call it from a worker thread while the forward runs."""
    rows = [c for c in constraints if c is not None]
    if len(rows) <= 1:
        for c in rows:
            c.fill_mask()
        return
    words = rows[0].mask.shape[0]
    if any(c.mask.shape[0] != words for c in rows):
        raise ValueError("fill_masks needs constraints of one vocabulary width")
    buf = np.empty((len(rows), words), np.int32)  # [B, W], one row per constraint
    (executor or _default_executor()).unsafe_compute_mask_ptr(
        [(c._m, i) for i, c in enumerate(rows)], buf.ctypes.data, words * 4, len(rows))
    for c, m in zip(rows, buf):
        c.mask[:] = m
        c._fresh = True


def apply_masks(logits: np.ndarray, constraints) -> None:
    """Mask the rows of logits [B, V'] (float32, writable: pass a copy of the backend's output) whose
    constraint is not None, in place; other rows are not touched. ~20-40 us per constrained row at V=49k."""
    for b, c in enumerate(constraints):
        if c is not None:
            c.apply(logits[b])


class MaskWorker:
    """Fills masks on a background thread while the caller runs the forward:

        fut = worker.submit(rows)          # before the forward (each row has consumed its last token)
        logits = backend.forward(...)
        if fut: fut.result()               # then apply_masks / sample / consume
    """

    def __init__(self, threads: int | None = None):
        """threads: llguidance's thread count for the masks (None: its default)."""
        self._executor = llguidance().LLExecutor(num_threads=threads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llamaexport-masks")

    def submit(self, constraints) -> Future | None:
        """Start filling the masks of the non-None constraints; None when there are none (nothing to wait for)."""
        rows = [c for c in constraints if c is not None]
        if not rows:
            return None
        return self._pool.submit(fill_masks, rows, executor=self._executor)

    def close(self):
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
