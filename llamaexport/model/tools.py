"""Tool calls (OpenAI's `tools` / `tool_choice`): how tools reach the prompt, the grammar that holds a
reply to a call format, and the parser that turns the reply back into OpenAI `tool_calls`.

Three call formats, named after the model families trained on them:

    llama3   Llama 3.1/3.2/3.3 JSON: the reply *is* the call, `{"name": ..., "parameters": {...}}`, maybe
             after `<|python_tag|>`; several calls are joined with "; " (vLLM's llama3_json convention;
             Meta's template renders one call per turn).
    hermes   Hermes 2 Pro / Qwen2.5 (and any ChatML model): free text, then one
             `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` block per call.
    mistral  Mistral v3: free text, then `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

`tool_format` picks one from the chat format: a chat template is recognised by the markers it writes
(`[TOOL_CALLS]` mistral, `<tool_call>` hermes, `<|python_tag|>` / `<|start_header_id|>` llama3,
`[INST]` mistral), the fixed formats map llama3 -> llama3, llama2 (the `[INST]` family) -> mistral,
and everything else (chatml, alpaca, vicuna, ...) -> hermes, whose text markers work with any vocabulary.

    prompt = render_chat(messages, tools=tools, tokenizer=tok)           # the template's own `tools` when it has them
    g = tool_grammar(tools, "required", fmt="hermes", special={...})     # Lark text; runtime.constraint compiles it
    reply = parse_tool_calls(text, "hermes")                             # content + OpenAI tool_calls

Pure Python: this module writes Lark grammar text and parses text; llguidance is the runtime's business.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from llamaexport import LlamaExportError
from llamaexport.model.chat import format_chat, render_template, resolve_format, without_bos
from llamaexport.model.schema import json_layout, strict_schema
from llamaexport.model.tool_parse import (
    MISTRAL_CALLS,
    PYTHON_TAG,
    TOOL_CALL,
    TOOL_CALL_END,
    ToolCallStream,
    ToolReply,
    new_call_id,
    parse_tool_calls,
)

TOOL_FORMATS = ("llama3", "hermes", "mistral")
# The strings each format's grammar and parser treat as markers (special tokens when the vocabulary has them).
MARKERS = {"llama3": (PYTHON_TAG,), "hermes": (TOOL_CALL, TOOL_CALL_END), "mistral": (MISTRAL_CALLS,)}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_TEMPLATE_MARKERS = ((MISTRAL_CALLS, "mistral"), (TOOL_CALL, "hermes"), (PYTHON_TAG, "llama3"),
                     ("<|start_header_id|>", "llama3"), ("[INST]", "mistral"))


class BadTools(LlamaExportError):
    """`tools`, `tool_choice` or a tool message is malformed; `param` is the request field to blame."""

    def __init__(self, message: str, *, param: str = "tools"):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Function:
    """One checked entry of `tools`: `index` is its place in the request (for error paths), `tool` the
    client's dict as given (what a prompt renders)."""
    name: str
    parameters: dict
    strict: bool
    index: int
    tool: dict


@dataclasses.dataclass(frozen=True)
class ToolGrammar:
    """Lark text for a reply in one call format, and the JSON schemas it embeds keyed by their request path
    ("tools[1].function.parameters"), so a compile error can name the schema at fault."""
    lark: str
    schemas: dict


# --- checking the request ---------------------------------------------------------------------


def check_tools(tools) -> list[Function]:
    """`tools` as Functions (an empty list for None or []); BadTools names the entry at fault."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadTools(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, got {type(tools).__name__}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise BadTools(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadTools(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise BadTools(f"{where}.function.name {name!r} is given twice")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}, "additionalProperties": False})  # no arguments
        if not isinstance(params, dict):
            raise BadTools(f"{where}.function.parameters must be a JSON Schema object")
        strict = fn.get("strict") is True
        out.append(Function(name, strict_schema(params) if strict else params, strict, i, tool))
    return out


def check_tool_choice(tool_choice, functions: list[Function]) -> str:
    """"none" | "auto" | "required" | the name of the one function to call (OpenAI's {"type": "function",
    "function": {"name": ...}}). None means "auto" with tools and "none" without, as OpenAI defaults."""
    if tool_choice is None:
        return "auto" if functions else "none"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise BadTools("tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
        if name not in {f.name for f in functions}:
            raise BadTools(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        return name
    if tool_choice not in ("none", "auto", "required"):
        raise BadTools(f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}",
                       param="tool_choice")
    if tool_choice == "required" and not functions:
        raise BadTools("tool_choice 'required' needs tools", param="tool_choice")
    return tool_choice


def tool_format(tokenizer=None, fmt: str = "auto") -> str:
    """The call format ("llama3" | "hermes" | "mistral") of a chat format (see the module docstring)."""
    chat_fmt = resolve_format(fmt, tokenizer)
    if chat_fmt == "template":
        template = tokenizer.chat_template or ""
        return next((tf for marker, tf in _TEMPLATE_MARKERS if marker in template), "hermes")
    return {"llama3": "llama3", "llama2": "mistral"}.get(chat_fmt, "hermes")


def template_declares_tools(template: str | None) -> bool:
    """Whether a chat template reads a `tools` variable (then it renders tools and tool messages itself)."""
    if not template:
        return False
    import jinja2
    from jinja2 import meta

    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])  # HF templates may {% break %}
        return "tools" in meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:
        return False


# --- prompts ----------------------------------------------------------------------------------


def render_chat(messages: list[dict], *, tools=None, tool_choice=None, tokenizer=None, fmt: str = "auto",
                system: str | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt for an OpenAI chat with tools: `messages` may hold assistant turns with `tool_calls`
    (content None or text) and `role: "tool"` results. `tool_choice` "none" renders no tools (the history
    still shows its calls). A chat template that reads `tools` renders everything itself, with call
    arguments as dicts (HF's convention); otherwise the calls, results and tool list are written into
    plain messages in the call format's layout and rendered by `format_chat`."""
    functions = check_tools(tools)
    shown = [] if check_tool_choice(tool_choice, functions) == "none" else functions
    msgs = _checked_messages(messages)
    if system is not None:  # before the tools join the system prompt
        msgs = [{"role": "system", "content": system}] + (msgs[1:] if msgs and msgs[0].get("role") == "system" else msgs)
    tf = tool_format(tokenizer, fmt)
    template = getattr(tokenizer, "chat_template", None)
    if resolve_format(fmt, tokenizer) == "template" and template_declares_tools(template):
        text = render_template(template, _for_template(msgs, tf), tokenizer=tokenizer,
                               add_generation_prompt=add_generation_prompt, tools=[f.tool for f in shown] or None)
        return without_bos(text, tokenizer)
    return format_chat(_PLAIN[tf](msgs, shown), tokenizer=tokenizer, fmt=fmt, add_generation_prompt=add_generation_prompt)


def _checked_messages(messages) -> list[dict]:
    """Messages with tool turns checked: assistant `tool_calls` carry function name and JSON arguments,
    tool results carry text. Other messages pass through to format_chat's own check."""
    if not isinstance(messages, list):
        raise BadTools("messages must be a list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadTools(f"messages[{i}] must be an object", param="messages")
        calls = m.get("tool_calls") or []
        if m.get("role") == "assistant" and calls:
            m = {**m, "content": m.get("content") or "", "tool_calls": [_checked_call(c, f"messages[{i}].tool_calls[{j}]")
                                                                         for j, c in enumerate(calls)]}
        elif m.get("role") == "tool" and not isinstance(m.get("content"), str):
            raise BadTools(f"messages[{i}].content of a tool message must be a string", param="messages")
        out.append(m)
    return out


def _checked_call(call, where) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
        raise BadTools(f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': str, "
                       "'arguments': JSON string}}}}", param="messages")
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        raise BadTools(f"{where}.function.arguments is not JSON: {fn['arguments'][:80]!r}", param="messages") from None
    return {"id": str(call.get("id") or ""), "name": fn["name"], "arguments": args}


def _for_template(msgs, tf) -> list[dict]:
    """Messages as HF chat templates read them: each call {"id", "type", "function": {"name", "arguments":
    dict}}. Mistral's template insists on 9-character alphanumeric ids, so ids are mapped to such."""
    ident = _mistral_id if tf == "mistral" else (lambda s: s)
    out = []
    for m in msgs:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            m = {**m, "tool_calls": [{"id": ident(c["id"]), "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in m["tool_calls"]]}
        elif m.get("role") == "tool" and "tool_call_id" in m:
            m = {**m, "tool_call_id": ident(str(m["tool_call_id"]))}
        out.append(m)
    return out


def _mistral_id(call_id: str) -> str:
    return call_id if re.fullmatch(r"[A-Za-z0-9]{9}", call_id) else hashlib.sha1(call_id.encode()).hexdigest()[:9]


def _dumps(x, **kw) -> str:
    return json.dumps(x, ensure_ascii=False, **kw)  # as HF's tojson writes it


def _merge_users(msgs) -> list[dict]:
    """Consecutive user messages joined into one (formats that insist on user/assistant turns)."""
    out = []
    for m in msgs:
        if out and m["role"] == out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(m)
    return out


def _hermes_plain(msgs, functions) -> list[dict]:
    # Qwen2.5's chat template (Qwen/Qwen2.5-7B-Instruct tokenizer_config.json, the same as Hermes 2 Pro's
    # tool_use template in layout): the tool list after the system prompt, each call a <tool_call> block in
    # the assistant turn, consecutive tool results in one user turn as <tool_response> blocks.
    out = []
    for m in msgs:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {_dumps(c["arguments"])}}}\n</tool_call>'
                      for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([m["content"]] if m["content"] else []) + blocks)})
        elif role == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append(m)
    out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
    if functions:
        listing = "".join("\n" + _dumps(f.tool) for f in functions)
        text = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" + listing +
                "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
                "<args-json-object>}\n</tool_call>")
        out = _with_system(out, text, "\n\n")
    return out


def _with_system(msgs, text, sep) -> list[dict]:
    if msgs and msgs[0].get("role") == "system":
        return [{"role": "system", "content": msgs[0]["content"] + sep + text}] + msgs[1:]
    return [{"role": "system", "content": text}] + msgs


def _llama3_plain(msgs, functions) -> list[dict]:
    # Meta's Llama 3.1 chat template (meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json, JSON tool
    # calling with tools_in_user_message): "Environment: ipython" opens the system prompt, the tool list and
    # its instructions open the first user message, a call is the bare JSON object with "parameters", a
    # result is an `ipython` turn. (The template's date lines belong to its system prompt, not to tools.)
    out = []
    for m in msgs:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [f'{{"name": "{c["name"]}", "parameters": {_dumps(c["arguments"])}}}' for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "; ".join(calls)})
        elif role == "tool":
            out.append({"role": "ipython", "content": m["content"]})
        else:
            out.append(m)
    if not functions:
        return out
    if out and out[0]["role"] == "system":
        out = [{"role": "system", "content": "Environment: ipython\n\n" + out[0]["content"]}] + out[1:]
    else:
        out = [{"role": "system", "content": "Environment: ipython"}] + out
    first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
    if first is None:
        raise BadTools("the Llama 3 tool format puts the tools in the first user message; there is none",
                       param="messages")
    listing = "".join(_dumps(f.tool, indent=4) + "\n\n" for f in functions)
    head = ("Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
            'value}.Do not use variables.\n\n')
    out[first] = {"role": "user", "content": head + listing + out[first]["content"].strip()}
    return out


def _mistral_plain(msgs, functions) -> list[dict]:
    # Mistral v3 (mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json): [AVAILABLE_TOOLS] before the last
    # user message, [TOOL_CALLS] [...] as the assistant turn, [TOOL_RESULTS] {...}[/TOOL_RESULTS] per result.
    # Here they are text inside [INST] turns (results join the next user turn), as the llama2 layout needs.
    out = []
    for m in msgs:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [f'{{"name": "{c["name"]}", "arguments": {_dumps(c["arguments"])}, "id": "{_mistral_id(c["id"])}"}}'
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": f"{MISTRAL_CALLS} [{', '.join(calls)}]"})
        elif role == "tool":
            call_id = _mistral_id(str(m.get("tool_call_id", "")))
            out.append({"role": "user", "tool_results": True, "content": f'[TOOL_RESULTS] {{"content": {m["content"]}, '
                                                                         f'"call_id": "{call_id}"}}[/TOOL_RESULTS]'})
        else:
            out.append(m)
    last = max((i for i, m in enumerate(out) if m["role"] == "user" and not m.get("tool_results")), default=None)
    if functions and last is not None:  # the last message the user wrote, as Mistral's template places it
        listing = ", ".join(f'{{"type": "function", "function": {_dumps(f.tool["function"])}}}' for f in functions)
        out[last] = {"role": "user", "content": f"[AVAILABLE_TOOLS] [{listing}][/AVAILABLE_TOOLS]" + out[last]["content"]}
    return _merge_users([{k: v for k, v in m.items() if k != "tool_results"} for m in out])


_PLAIN = {"hermes": _hermes_plain, "llama3": _llama3_plain, "mistral": _mistral_plain}


# --- grammars ---------------------------------------------------------------------------------


def tool_grammar(tools, tool_choice=None, *, fmt: str, special: dict | None = None, parallel: bool = True,
                 max_whitespace: int = 0) -> ToolGrammar | None:
    """The Lark grammar a reply in call format `fmt` must follow, or None when no call is possible
    ("none", or no tools).

    "auto": free text, and a call only from the format's opening marker on (a lazy lexeme ends the text
    at a marker written as text; a marker that is a special token cannot occur in free text at all), or
    for llama3 a reply that starts with "{" / <|python_tag|>. "required": a call from the first token.
    A named function: one call of it. Each call's arguments follow its `parameters` schema, strict ones
    refusing undeclared keys; several calls where the format allows and `parallel`. `special` maps the
    markers that are special tokens in the vocabulary to their ids, which the grammar names as `<[id]>`
    (a special token's text would not match it, and `[TOOL_CALLS]` has no name syntax).
    """
    if fmt not in TOOL_FORMATS:
        raise LlamaExportError(f"unknown tool-call format {fmt!r}; choose one of: {', '.join(TOOL_FORMATS)}")
    functions = check_tools(tools)
    choice = check_tool_choice(tool_choice, functions)
    if choice == "none" or not functions:
        return None
    if choice not in ("auto", "required"):
        functions, parallel = [f for f in functions if f.name == choice], False
    layout = json_layout(max_whitespace)
    key = "parameters" if fmt == "llama3" else "arguments"
    rules, schemas = [], {}
    for i, f in enumerate(functions):
        schema = {**f.parameters, "x-guidance": {**layout, "lenient": not f.strict}}
        head = _lit('{"name": ' + _dumps(f.name) + f', "{key}": ')
        rules.append(f'fn_{i}: {head} %json {_dumps(schema)} "}}"')
        schemas[f"tools[{f.index}].function.parameters"] = schema
    marker = lambda s: f"<[{special[s]}]>" if special and s in special else _lit(s)  # noqa: E731
    top = _TOPS[fmt](marker, auto=choice == "auto", parallel=parallel)
    body = "body: " + " | ".join(f"fn_{i}" for i in range(len(functions)))
    return ToolGrammar("\n".join(["%llguidance {}", *top, body, *rules]) + "\n", schemas)


def _lit(s: str) -> str:
    return _dumps(s)  # a Lark string literal


_TEXT = "TEXT: /(.|\\n)*/"  # free text; special tokens are never part of it


def _hermes_top(marker, *, auto, parallel):
    open_, close = marker(TOOL_CALL), marker(TOOL_CALL_END)
    more = f' ("\\n" {open_} "\\n" body "\\n" {close})*' if parallel else ""
    if not auto:
        return [f'start: {open_} "\\n" body "\\n" {close}{more}']
    if open_.startswith("<["):
        return [f'start: TEXT | TEXT {open_} "\\n" body "\\n" {close}{more}', _TEXT]
    # a text marker: the lazy lexeme ends the free text at the marker's first occurrence
    return [f'start: TEXT | prefix "\\n" body "\\n" {close}{more}', f"prefix[lazy]: TEXT {open_}", _TEXT]


def _llama3_top(marker, *, auto, parallel):
    tag = marker(PYTHON_TAG)
    calls = 'body ("; " body)*' if parallel else "body"
    # <|python_tag|> only where it is a special token: a model without it never writes it
    tagged = [f"{tag} {calls}"] if tag.startswith("<[") else []
    if not auto:
        return ["start: " + " | ".join([calls, *tagged])]
    # a reply whose first non-blank character is "{" is a call (the llama.cpp / vLLM reading), else text
    return ["start: " + " | ".join(["TEXT", f"WS {calls}", *tagged]),
            "TEXT: /[ \\t\\n]*([^{ \\t\\n](.|\\n)*)?/", "WS: /[ \\t\\n]*/"]


def _mistral_top(marker, *, auto, parallel):
    tag = marker(MISTRAL_CALLS)
    calls = '" "? "[" body' + (' (", " body)*' if parallel else "") + ' "]"'
    if not auto:
        return [f"start: {tag} {calls}"]
    if tag.startswith("<["):
        return [f"start: TEXT | TEXT {tag} {calls}", _TEXT]
    return [f"start: TEXT | prefix {calls}", f"prefix[lazy]: TEXT {tag}", _TEXT]


_TOPS = {"hermes": _hermes_top, "llama3": _llama3_top, "mistral": _mistral_top}


__all__ = ["BadTools", "Function", "MARKERS", "TOOL_FORMATS", "ToolCallStream", "ToolGrammar", "ToolReply",
           "check_tool_choice", "check_tools", "new_call_id", "parse_tool_calls", "render_chat",
           "template_declares_tools", "tool_format", "tool_grammar"]
