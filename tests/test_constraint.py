"""Constrained decoding (runtime.constraint) on both tokenizer kinds: SmolLM2's byte-level BPE (from the
GGUF, masks as wide as a padded model vocabulary) and a tiny sentencepiece model. Text generated from
seeded random logits under each constraint kind parses and validates; masks allow EOS only where the
grammar accepts and never a padded id; unconstrained rows are untouched; bad specs fail before anything
runs, naming the part."""

import json
import re
import sys

import numpy as np
import pytest
from conftest import sample_constrained

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from llamaexport import LlamaExportError  # noqa: E402
from llamaexport.runtime.constraint import (  # noqa: E402
    BadConstraint,
    Constraint,
    MaskWorker,
    apply_masks,
    compile_constraint,
    compile_tools,
    constraint_tokenizer,
    fill_masks,
)

PERSON = {  # five properties of every kind a schema has
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                   "ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
    "required": ["name", "age", "tags", "ok", "kind"],
}
NESTED = {  # $defs and $ref, anyOf, a nested object, an optional key
    "type": "object",
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                        "required": ["x", "y"]}},
    "properties": {"at": {"$ref": "#/$defs/point"}, "label": {"anyOf": [{"type": "string", "maxLength": 6},
                                                                         {"type": "null"}]},
                   "size": {"type": "number", "minimum": 0, "maximum": 10}},
    "required": ["at", "label"],
}
REGEX = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org|net)"
LARK = 'start: "sum(" num (", " num)* ")"\nnum: /[0-9]{1,3}/\n'
GBNF = 'root ::= answer " " digit+\nanswer ::= "yes" | "no"\ndigit ::= [0-9]\n'


def json_check(schema):
    return lambda text: jsonschema.validate(json.loads(text), schema)


CASES = {  # spec, check of the generated text
    "json_object": ({"type": "json_object"}, lambda text: isinstance(json.loads(text), dict) or pytest.fail(text)),
    "json_schema_strict": ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
                           json_check({**PERSON, "additionalProperties": False})),
    "json_schema_lenient": ({"type": "json_schema", "json_schema": {"name": "shape", "schema": NESTED}}, json_check(NESTED)),
    "regex": ({"type": "regex", "regex": REGEX}, lambda text: re.fullmatch(REGEX, text) or pytest.fail(text)),
    "lark": ({"type": "lark", "lark": LARK}, lambda text: re.fullmatch(r"sum\(\d{1,3}(, \d{1,3})*\)", text) or pytest.fail(text)),
    "gbnf": ({"type": "gbnf", "gbnf": GBNF}, lambda text: re.fullmatch(r"(yes|no) \d+", text) or pytest.fail(text)),
}


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def vocab(request):
    """(tokenizer, n_vocab, bias): n_vocab is a model's padded vocabulary; bias [n_vocab] favours tokens
    holding '"', '}' or ']', so random JSON closes its strings and containers."""
    if request.param == "smollm2":
        tok = request.getfixturevalue("smol_tokenizer")
        n_vocab = tok.vocab_size + 64  # as if the embedding were padded to a multiple of 64
    else:
        tok = request.getfixturevalue("spm_tokenizer")
        n_vocab = 512  # the tiny model's vocabulary around the 400 pieces
    bias = np.zeros(n_vocab, np.float32)
    for i in range(tok.vocab_size):
        if any(c in tok.decode([i], skip_special=False) for c in '"}]'):
            bias[i] = 6.0
    return tok, n_vocab, bias


def compile_(spec, vocab, **kw):
    tok, n_vocab, _ = vocab
    return compile_constraint(spec, tok, n_vocab=n_vocab, **kw)


def ids(tok, text):
    """`text` as a model writes it mid-reply (sentencepiece without its dummy-prefix space)."""
    return constraint_tokenizer(tok, tok.vocab_size).tokenize_str(text)


def feed(c: Constraint, tok, text: str) -> bool:
    """Consume `text`'s tokens one by one, each after a fresh mask; False at the first refusal."""
    for t in ids(tok, text):
        c.fill_mask()
        if not c.consume(t):
            return False
    return True


@pytest.mark.parametrize("case", list(CASES))
def test_generation_follows_each_kind(vocab, case):
    tok, _, bias = vocab
    spec, check = CASES[case]
    grammar = compile_(spec, vocab)
    for seed in range(3):
        c = Constraint(grammar)
        ids, finished = sample_constrained(c, np.random.default_rng(seed), tokenizer=tok, bias=bias)
        assert finished, tok.decode(ids)
        check(tok.decode(ids))


def test_tokenizer_bridge(vocab):
    tok, n_vocab, _ = vocab
    lltok = constraint_tokenizer(tok, n_vocab)
    assert constraint_tokenizer(tok, n_vocab) is lltok  # built once
    assert lltok.vocab_size == n_vocab and lltok.eos_tokens == tok.eos_ids
    assert all(lltok.is_special_token(i) for i in tok.eos_ids)
    text = 'def f(x):\n    return {"a": 12, "b": "héllo 日本"}'
    # the bytes of the ids (sentencepiece's encoder puts its dummy-prefix space first, as a model sees it)
    assert lltok.decode_str(tok.encode(text, add_bos=False)) in (text, " " + text)
    # fragments a grammar forces are encoded without sentencepiece's dummy-prefix space
    assert lltok.decode_str(lltok.tokenize_str("def")) == "def"
    with pytest.raises(LlamaExportError, match="smaller than the tokenizer"):
        constraint_tokenizer(tok, tok.vocab_size - 1)


def test_eos_only_where_the_grammar_accepts(vocab):
    tok = vocab[0]
    c = Constraint(compile_({"type": "json_object"}, vocab))
    c.fill_mask()
    assert not c.accepting and not set(tok.eos_ids) & set(c.allowed())
    assert feed(c, tok, '{"a": [1, 2')
    c.fill_mask()
    assert not set(tok.eos_ids) & set(c.allowed())
    assert feed(c, tok, "]}")
    assert c.stopped and c.accepting  # nothing can follow a closed object: the engine can finish now
    c.fill_mask()
    assert set(c.allowed()) == set(tok.eos_ids)
    assert c.consume(tok.eos_ids[0])


def test_apply_touches_only_constrained_rows(vocab):
    tok, n_vocab, _ = vocab
    rng = np.random.default_rng(0)
    g = compile_({"type": "json_schema", "json_schema": {"schema": PERSON}}, vocab)
    a, b = Constraint(g), Constraint(g)
    assert feed(b, tok, '{"name": "')  # b inside a free string: most tokens allowed; a: only '{' things
    fill_masks([a, None, b])
    logits = rng.standard_normal((3, n_vocab)).astype(np.float32)
    before = logits.copy()
    apply_masks(logits, [a, None, b])
    assert np.array_equal(logits[1], before[1])  # bit for bit
    for row, c in ((0, a), (2, b)):
        allowed = np.zeros(n_vocab, bool)
        allowed[c.allowed()] = True
        assert np.array_equal(logits[row], np.where(allowed, before[row], -np.inf))
        assert np.isneginf(logits[row, tok.vocab_size:]).all()
    assert len(a.allowed()) < n_vocab // 16 < len(b.allowed())  # both branches of apply ran


def test_batched_fill_equals_one_by_one(vocab):
    tok = vocab[0]
    g = compile_({"type": "json_schema", "json_schema": {"schema": PERSON}}, vocab)
    rows = [Constraint(g) for _ in range(4)]
    for c, text in zip(rows, ["", '{"name": "x', '{"name": "x", "age": 3', '{"name": "x", "age": 3, "tags": []']):
        assert feed(c, tok, text)
    singles = [c.fork().fill_mask().copy() for c in rows]
    fill_masks(rows)
    assert all(np.array_equal(c.mask, m) for c, m in zip(rows, singles))
    with MaskWorker(threads=1) as worker:
        for c in rows:
            c.mask[:] = 0
        worker.submit([rows[0], None, *rows[1:]]).result()
        assert all(np.array_equal(c.mask, m) for c, m in zip(rows, singles))
        assert worker.submit([None, None]) is None  # nothing constrained: nothing to wait for


def test_fork_rollback_and_drafts(vocab):
    tok = vocab[0]
    c = Constraint(compile_({"type": "regex", "regex": REGEX}, vocab))
    assert feed(c, tok, "ab")
    start = c.fill_mask().copy()
    twin = c.fork()
    assert feed(twin, tok, "c@xy.org") and twin.stopped
    assert not c.stopped and np.array_equal(c.fill_mask(), start)  # the original did not move
    n = len(ids(tok, "c@xy"))
    assert feed(c, tok, "c@xy")
    c.rollback(n)
    assert np.array_equal(c.fill_mask(), start)
    draft = ids(tok, "c@xy.org")
    assert c.valid_prefix(draft) == len(draft)
    assert c.valid_prefix(ids(tok, "c@@")) < len(ids(tok, "c@@"))


def test_stale_mask_and_refused_token(vocab):
    tok, n_vocab, _ = vocab
    c = Constraint(compile_({"type": "regex", "regex": "[0-9]+"}, vocab))
    with pytest.raises(RuntimeError, match="stale"):
        c.apply(np.zeros(n_vocab, np.float32))
    c.fill_mask()
    refused = next(i for i in range(tok.vocab_size) if i not in set(c.allowed()) and i not in tok.eos_ids)
    assert not c.consume(refused) and c.error and c.stopped
    row = np.zeros(n_vocab, np.float32)
    c.fill_mask()
    c.apply(row)  # an errored row allows nothing: EOS is left so it ends
    assert set(np.flatnonzero(np.isfinite(row))) == set(tok.eos_ids)


def test_strict_and_lenient_schemas(vocab):
    tok = vocab[0]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for strict, extra_key_ok in ((True, False), (False, True)):
        g = compile_({"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": strict}}, vocab)
        assert feed(Constraint(g), tok, '{"a": 1, "b": 2}') == extra_key_ok
    fmt = {"type": "object", "properties": {"when": {"type": "string", "format": "no-such-format"}}}
    with pytest.raises(BadConstraint, match="at /properties/when: Unknown format"):
        compile_({"type": "json_schema", "json_schema": {"schema": fmt, "strict": True}}, vocab)
    lenient = compile_({"type": "json_schema", "json_schema": {"schema": fmt}}, vocab)
    assert any("no-such-format" in w for w in lenient.warnings)


def test_json_has_no_free_whitespace(vocab):
    tok = vocab[0]
    compact = compile_({"type": "json_object"}, vocab)
    assert feed(Constraint(compact), tok, '{"a": [1, 2], "b": {}}')
    for loose in ('{ "a": 1}', '{"a":1}', '{\n  "a": 1}'):
        assert not feed(Constraint(compact), tok, loose)
    pretty = compile_({"type": "json_object"}, vocab, max_whitespace=3)
    assert feed(Constraint(pretty), tok, '{\n  "a": 1\n}')
    assert not feed(Constraint(pretty), tok, '{\n      "a": 1}')  # 7 blanks in a row


@pytest.mark.parametrize("spec, param, message", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"n": {"type": "integr"}}}}},
     "response_format", "response_format.json_schema.schema at /properties/n: Invalid type: integr"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {
        "x": {"type": "object", "properties": {"y": {"type": "string", "format": "nope"}}}}}, "strict": True}},
     "response_format", "at /properties/x/properties/y: Unknown format: nope"),
    ({"type": "json_schema", "json_schema": {"schema": {"$defs": {"p": {"type": "strin"}}, "type": "object",
                                                        "properties": {"a": {"$ref": "#/$defs/p"}}}}},
     "response_format", "at /$defs/p: Invalid type: strin"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}}, "response_format", "missing"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}}, "response_format", "JSON Schema object"),
    ({"type": "json_schema"}, "response_format", "JSON Schema object"),
    ({"type": "regex", "regex": "a(b"}, "regex", "regex: invalid regex"),
    ({"type": "regex", "regex": 5}, "regex", "must be a string"),
    ({"type": "lark", "lark": "start: foo"}, "grammar", 'grammar: at 1(8): unknown name: "foo"'),
    ({"type": "gbnf", "gbnf": 'root ::= ("a"'}, "grammar", "GBNF"),
    ({"type": "gbnf", "gbnf": 'root ::= "a" undefined-rule'}, "grammar", "undefined-rule"),
    ({"type": "xml"}, "response_format", "must be one of"),
    ("json", "response_format", "must be one of"),
])
def test_bad_constraints_name_the_part(smol_tokenizer, spec, param, message):
    with pytest.raises(BadConstraint) as e:
        compile_constraint(spec, smol_tokenizer)
    assert message in str(e.value) and e.value.param == param and "\n" not in str(e.value)


def test_bad_tool_schema_names_the_tool(smol_tokenizer):
    tools = [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "f", "parameters": {
                 "type": "object", "properties": {"x": {"type": "integr"}}}}}]
    with pytest.raises(BadConstraint) as e:
        compile_tools(tools, "auto", smol_tokenizer, fmt="hermes")
    assert str(e.value) == "tools[1].function.parameters at /properties/x: Invalid type: integr"
    assert e.value.param == "tools"


def test_text_is_no_constraint(smol_tokenizer):
    assert compile_constraint({"type": "text"}, smol_tokenizer) is None


def test_missing_llguidance_names_the_extra(smol_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    with pytest.raises(LlamaExportError, match=r"pip install 'llamaexport\[structured\]'"):
        compile_constraint({"type": "json_object"}, smol_tokenizer, n_vocab=smol_tokenizer.vocab_size + 1)


def test_completion_advances_the_grammar_and_finishes(vocab):
    """runtime.completion.Completion consumes each pushed id into its row's grammar (the one place, for the
    engine and LlamaModel.stream): a grammar that can only take EOS next ends it with "stop" before any EOS;
    max_new_tokens first ends it with "length" (the JSON unfinished); a refused id with "error", saying why."""
    from llamaexport.runtime.completion import Completion, FinishReason

    tok = vocab[0]

    def completion(spec, max_new_tokens=50):
        return Completion(tok, prompt_ids=[], eos_ids=frozenset(tok.eos_ids), max_new_tokens=max_new_tokens,
                          constraint=Constraint(compile_(spec, vocab)))
    c = completion({"type": "regex", "regex": "ab"})
    for t in ids(tok, "ab"):
        c.push(t)
    assert c.reason is FinishReason.STOP and c.text == "ab"
    c = completion({"type": "json_object"}, max_new_tokens=2)
    for t in ids(tok, '{"a": 1}')[:2]:
        c.push(t)
    assert c.reason is FinishReason.LENGTH and not c.constraint.accepting
    c = completion({"type": "regex", "regex": "ab"})
    assert c.push(ids(tok, "b")[0]) is None
    assert c.reason is FinishReason.ERROR and "the grammar refused token" in c.error
