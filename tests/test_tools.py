"""Tool calls (model.tools, model.tool_parse, and their grammars compiled by runtime.constraint): prompts
render tools, calls and results as each model family's template does; under `required` or a named
function every reply generated from random logits parses into calls whose arguments validate; `auto`
lets free text through and constrains from the marker on; the streaming parser's deltas reassemble to
exactly what the whole-text parser returns."""

import copy
import itertools
import json

import numpy as np
import pytest
from conftest import sample_constrained

from llamaexport import LlamaExportError
from llamaexport.model.tokenizer import HFTokenizer, StreamDecoder
from llamaexport.model.tools import (
    MARKERS,
    BadTools,
    ToolCallStream,
    check_tool_choice,
    check_tools,
    parse_tool_calls,
    render_chat,
    template_declares_tools,
    tool_format,
    tool_grammar,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}, "strict": True}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def counter_ids():
    n = itertools.count()
    return lambda: f"call_{next(n)}"


# --- checking requests -------------------------------------------------------------------------


@pytest.mark.parametrize("tools, message", [
    ("x", "tools must be a list"),
    ([{"type": "function"}], "tools[0] must be"),
    ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name must be"),
    ([ADD, ADD], "tools[1].function.name 'add' is given twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
])
def test_bad_tools(tools, message):
    with pytest.raises(BadTools, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        check_tools(tools)
    assert e.value.param == "tools"


def test_tool_choice():
    fns = check_tools(TOOLS)
    assert check_tool_choice(None, fns) == "auto" and check_tool_choice(None, []) == "none"
    assert check_tool_choice({"type": "function", "function": {"name": "add"}}, fns) == "add"
    for bad in ("any", {"type": "function", "function": {"name": "nope"}}, {"function": "add"}):
        with pytest.raises(BadTools) as e:
            check_tool_choice(bad, fns)
        assert e.value.param == "tool_choice"
    with pytest.raises(BadTools, match="needs tools"):
        check_tool_choice("required", [])
    strict = fns[0].parameters  # strict: undeclared keys refused, as OpenAI's strict mode
    assert strict["additionalProperties"] is False and "additionalProperties" not in WEATHER["function"]["parameters"]


def test_tool_format_from_chat_format(smol_tokenizer):
    assert [tool_format(None, f) for f in ("llama3", "chatml", "llama2", "alpaca", "vicuna")] == [
        "llama3", "hermes", "mistral", "hermes", "hermes"]
    assert tool_format(smol_tokenizer) == "hermes"  # SmolLM2's ChatML template
    for template, expected in (("{{ '[TOOL_CALLS]' }}", "mistral"), ("{{ '<|start_header_id|>' }}", "llama3"),
                               ("{{ '<tool_call>' }}{{ '<|im_start|>' }}", "hermes"), ("{{ '[INST]' }}", "mistral")):
        tok = copy.copy(smol_tokenizer)
        tok.chat_template = template
        assert tool_format(tok) == expected
    assert template_declares_tools("{% if tools %}x{% endif %}") and not template_declares_tools(smol_tokenizer.chat_template)


# --- prompts ------------------------------------------------------------------------------------

SMALL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
SMALL2 = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def test_hermes_prompt_is_qwen25_layout():
    # Expected text written from Qwen2.5's chat template (Qwen/Qwen2.5-7B-Instruct tokenizer_config.json;
    # the same file as huggingface/trl trl/chat_templates/qwen2_5.jinja): tools after the system prompt,
    # calls as <tool_call> blocks, consecutive tool results in one user turn.
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris, and 2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_1", "get_weather", {"city": "Paris"}),
                                                              call("call_2", "add", {"a": 2, "b": 3})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "5"},
        {"role": "assistant", "content": "Once more.", "tool_calls": [call("call_3", "add", {"a": 1, "b": 1})]},
        {"role": "tool", "tool_call_id": "call_3", "content": "2"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": '
        '{"city": {"type": "string"}}}}}\n'
        '{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
        'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris, and 2+3?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n22C\n</tool_response>\n<tool_response>\n5\n</tool_response><|im_end|>\n"
        '<|im_start|>assistant\nOnce more.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(messages, tools=[SMALL, SMALL2], fmt="chatml") == expected
    # tool_choice "none": no tool list, the history as it was
    none = render_chat(messages, tools=[SMALL, SMALL2], tool_choice="none", fmt="chatml")
    history = expected[expected.index("<|im_start|>user"):]
    assert none == "<|im_start|>system\nBe brief.<|im_end|>\n" + history


def test_llama3_prompt_is_llama31_layout():
    # Expected text written from Meta's Llama 3.1 chat template (meta-llama/Llama-3.1-8B-Instruct
    # tokenizer_config.json, custom tools in the first user message; huggingface/trl
    # trl/chat_templates/llama3_1.jinja), less its "Cutting Knowledge Date" lines, which our llama3 format
    # never writes: "Environment: ipython", the instructions and the tool list indented by 4, the call as
    # a bare JSON object with "parameters", the result as an ipython turn.
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_weather", {"city": "Paris"})]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 22}'}]
    listing = ('{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n        "parameters": {\n'
               '            "type": "object",\n            "properties": {\n                "city": {\n'
               '                    "type": "string"\n                }\n            }\n        }\n    }\n}')
    expected = (
        "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
        "function call with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n" + listing + "\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n" + '{"temp": 22}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_chat(messages, tools=[SMALL], fmt="llama3") == expected


def test_mistral_prompt_on_inst_format():
    messages = [{"role": "user", "content": "Add 2 and 3"},
                {"role": "assistant", "content": None, "tool_calls": [call("call_abc", "add", {"a": 2, "b": 3})]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "5"},
                {"role": "user", "content": "Thanks"}]
    text = render_chat(messages, tools=[SMALL2], fmt="llama2")
    call_id = text.split('"id": "')[1][:9]  # Mistral's 9-character ids, the same for the call and its result
    assert call_id.isalnum() and len(call_id) == 9
    assert text == (
        '[INST] Add 2 and 3 [/INST] [TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "' + call_id +
        '"}] </s><s>[INST] [TOOL_RESULTS] {"content": 5, "call_id": "' + call_id + '"}[/TOOL_RESULTS]\n\n'
        '[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]'
        "[/AVAILABLE_TOOLS]Thanks [/INST]")


def test_template_that_reads_tools_gets_them(smol_tokenizer):
    tok = copy.copy(smol_tokenizer)
    tok.chat_template = (
        "{% for t in tools or [] %}T:{{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content or '' }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
        "{% if m.tool_call_id %}<{{ m.tool_call_id }}>{% endif %}{{ '\\n' }}{% endfor %}")
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [call("c1", "get_weather", {"city": "Oslo"})]},
                {"role": "tool", "tool_call_id": "c1", "content": "cold"}]
    # arguments reach the template as a dict (HF's convention), tools as the client gave them
    assert render_chat(messages, tools=TOOLS, tokenizer=tok) == (
        "T:get_weather\nT:add\nuser:hi\nassistant:[get_weather Oslo]\ntool:cold<c1>\n")
    assert render_chat(messages, tools=TOOLS, tool_choice="none", tokenizer=tok).startswith("user:hi")


def test_bad_tool_messages():
    bad_args = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]}]
    with pytest.raises(BadTools, match=r"messages\[1\].tool_calls\[0\].function.arguments is not JSON"):
        render_chat(bad_args, tools=TOOLS, fmt="chatml")
    with pytest.raises(BadTools, match="first user message"):
        render_chat([{"role": "system", "content": "s"}], tools=TOOLS, fmt="llama3")
    with pytest.raises(LlamaExportError, match="unknown tool-call format"):
        tool_grammar(TOOLS, fmt="qwen")


# --- grammars on real vocabularies ---------------------------------------------------------------


@pytest.fixture(scope="module")
def marker_tokenizer(smol_tokenizer):
    """SmolLM2's tokenizer with every format's markers added as special tokens (as in Llama 3, Qwen2.5 and
    Mistral vocabularies): the grammars then name them by id."""
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(smol_tokenizer.backend.to_str())
    backend.add_special_tokens([AddedToken(m, special=True) for ms in MARKERS.values() for m in ms])
    return HFTokenizer(backend, eos_ids=smol_tokenizer.eos_ids, bos_id=smol_tokenizer.bos_id)


def grammar(tok, tools, choice, fmt, **kw):
    from llamaexport.runtime.constraint import compile_tools

    pytest.importorskip("llguidance")
    return compile_tools(tools, choice, tok, fmt=fmt, n_vocab=tok.vocab_size + 32, **kw)


def generate(tok, g, seed, prefix=""):
    """Reply text (special tokens kept, as the tool parser reads it) generated under grammar g."""
    from llamaexport.runtime.constraint import Constraint

    c = Constraint(g)
    ids = c.grammar.lltokenizer.tokenize_str(prefix, parse_special=True) if prefix else []
    for t in ids:
        c.fill_mask()
        assert c.consume(t), c.error
    out, finished = sample_constrained(c, np.random.default_rng(seed), tokenizer=tok, max_tokens=300)
    assert finished, tok.decode(ids + out, skip_special=False)
    return tok.decode(ids + out, skip_special=False)


def check_calls(reply, names=None):
    assert reply.tool_calls
    for c in reply.tool_calls:
        assert c["id"].startswith("call_") and c["type"] == "function"
        name = c["function"]["name"]
        assert name in (names or SCHEMAS)
        pytest.importorskip("jsonschema").validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("vocab", ["text markers", "special markers"])
def test_required_always_yields_valid_calls(request, fmt, vocab):
    tok = request.getfixturevalue("smol_tokenizer" if vocab == "text markers" else "marker_tokenizer")
    g = grammar(tok, TOOLS, "required", fmt)
    assert ("<[" in g.text) == (vocab == "special markers")  # markers named by id where they are special tokens
    for seed in range(3):
        text = generate(tok, g, seed)
        reply = parse_tool_calls(text, fmt)
        check_calls(reply)
        assert reply.content is None, text
        assert_stream_agrees(text, fmt, tok)


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_named_function_and_no_parallel(marker_tokenizer, fmt):
    g = grammar(marker_tokenizer, TOOLS, {"type": "function", "function": {"name": "add"}}, fmt)
    for seed in range(3):
        reply = parse_tool_calls(generate(marker_tokenizer, g, seed), fmt)
        check_calls(reply, names=["add"])
        assert len(reply.tool_calls) == 1


def test_function_without_parameters_takes_none(smol_tokenizer):
    g = grammar(smol_tokenizer, [{"type": "function", "function": {"name": "ping"}}], "required", "hermes")
    reply = parse_tool_calls(generate(smol_tokenizer, g, 0), "hermes")
    assert {(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls} == {("ping", "{}")}


def test_sentencepiece_vocabulary(spm_tokenizer):
    g = grammar(spm_tokenizer, TOOLS, "required", "hermes")
    for seed in range(2):
        check_calls(parse_tool_calls(generate(spm_tokenizer, g, seed), "hermes"))


@pytest.mark.parametrize("vocab", ["smol_tokenizer", "marker_tokenizer"])
def test_auto_hermes_free_text_then_constrained(request, vocab):
    from llamaexport.runtime.constraint import Constraint

    tok = request.getfixturevalue(vocab)
    g = grammar(tok, TOOLS, "auto", "hermes")
    lltok = g.lltokenizer
    c = Constraint(g)
    c.fill_mask()
    assert len(c.allowed()) > tok.vocab_size // 2  # free text: nearly every token
    for t in lltok.tokenize_str("Sure, let me check. "):
        c.fill_mask()
        assert c.consume(t)
    assert c.accepting  # a plain answer may end here
    for t in lltok.tokenize_str("<tool_call>\n", parse_special=True):
        c.fill_mask()
        assert c.consume(t), c.error
    c.fill_mask()
    assert not set(lltok.tokenize_str("hello")[:1]) & set(c.allowed())  # after the marker: only a call
    assert not c.accepting
    for seed in range(3):
        text = generate(tok, g, seed, prefix="Sure, let me check. <tool_call>")
        reply = parse_tool_calls(text, "hermes")
        assert reply.content == "Sure, let me check."
        check_calls(reply)
        assert_stream_agrees(text, "hermes", tok)


def test_auto_llama3_and_mistral(marker_tokenizer):
    from llamaexport.runtime.constraint import Constraint

    tok = marker_tokenizer
    for fmt, opener in (("llama3", "<|python_tag|>"), ("llama3", "{"), ("mistral", "Calling. [TOOL_CALLS]")):
        g = grammar(tok, TOOLS, "auto", fmt)
        c = Constraint(g)
        for t in g.lltokenizer.tokenize_str("It is sunny.", parse_special=True) + tok.eos_ids[:1]:
            c.fill_mask()
            assert c.consume(t), c.error  # free text, then EOS
        text = generate(tok, g, 0, prefix=opener)
        check_calls(parse_tool_calls(text, fmt))
        assert_stream_agrees(text, fmt, tok)
    g = grammar(tok, TOOLS, "auto", "llama3")
    c = Constraint(g)
    for t in g.lltokenizer.tokenize_str('{"name": "'):
        c.fill_mask()
        assert c.consume(t)
    c.fill_mask()
    assert not set(g.lltokenizer.tokenize_str("nope")[:1]) & set(c.allowed())  # a known name only


def test_tool_choice_none_has_no_grammar():
    assert tool_grammar(TOOLS, "none", fmt="hermes") is None and tool_grammar([], None, fmt="hermes") is None


# --- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, text, content, calls", [
    ("hermes", 'Checking.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n'
               '{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "unit": "c"}}\n</tool_call>',
     "Checking.", [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "Pa\\"ris}", "unit": "c"}')]),
    ("hermes", "No tools needed <tool here.  ", "No tools needed <tool here.", []),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2', None, [("add", '{"a": 1, "b": 2')]),  # cut short
    ("hermes", "<tool_call>\nnot a call</tool_call>", "<tool_call>\nnot a call</tool_call>", []),
    ("mistral", '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}, {"name": "f", "arguments": {}, "id": "x1"}]',
     None, [("add", '{"a": 1}'), ("f", "{}")]),
    ("llama3", '  {"name": "add", "parameters": {"a": 1}}; {"name": "f", "parameters": {}}', None,
     [("add", '{"a": 1}'), ("f", "{}")]),
    ("llama3", '<|python_tag|>{"name": "add", "arguments": [1, "]"]}', None, [("add", '[1, "]"]')]),
    ("llama3", 'Use {"name": "add"} here', 'Use {"name": "add"} here', []),
    ("llama3", '{"name": 5}', '{"name": 5}', []),
])
def test_parse(fmt, text, content, calls):
    reply = parse_tool_calls(text, fmt, new_id=counter_ids())
    assert reply.content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls] == calls
    assert [c["id"] for c in reply.tool_calls] == [f"call_{i}" for i in range(len(calls))]
    for size in (1, 2, 5):
        assert_stream_agrees(text, fmt, chunks=[text[i:i + size] for i in range(0, len(text), size)])


def test_stream_delta_format():
    stream = ToolCallStream("hermes", new_id=counter_ids())
    deltas = []
    for piece in ["Hi", " there", "\n<tool", '_call>\n{"name": "add", ', '"arguments": {"a"', ": 1}}\n</tool_call>"]:
        deltas += stream.push(piece)
    deltas += stream.finish()
    assert deltas == [
        {"content": "Hi"}, {"content": " there"},
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function", "function": {"name": "add", "arguments": "{\"a\""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
    ]
    assert stream.calls == 1


def assert_stream_agrees(text, fmt, tok=None, chunks=None):
    """The streamed deltas of `text` (cut into `chunks`, else into the pieces StreamDecoder prints per
    token, else one character at a time) reassemble to parse_tool_calls(text)."""
    if chunks is None and tok is not None:
        ids = tok.encode(text, add_bos=False)
        dec = StreamDecoder(tok, skip_special=False)
        chunks = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(chunks) == text
    expected = parse_tool_calls(text, fmt, new_id=counter_ids())
    for pieces in ([*text] if chunks is None else chunks, [text]):
        stream = ToolCallStream(fmt, new_id=counter_ids())
        deltas = [d for p in pieces for d in stream.push(p)] + stream.finish()
        content = "".join(d.get("content", "") for d in deltas) or None
        calls = {}
        for d in deltas:
            for tc in d.get("tool_calls", []):
                if "id" in tc:
                    calls[tc["index"]] = copy.deepcopy(tc)
                else:
                    calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
        assert content == expected.content
        assert [{k: v for k, v in calls[i].items() if k != "index"} for i in sorted(calls)] == expected.tool_calls
        assert stream.calls == len(expected.tool_calls)
