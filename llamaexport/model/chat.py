"""Chat prompts: a list of messages rendered as the text a chat model was trained on.

    prompt = format_chat([{"role": "user", "content": "Hi"}], tokenizer=tok)  # its chat template
    ids = tok.encode(prompt)                                                   # BOS added here

BOS is the tokenizer's job: `format_chat` never starts its text with the BOS token when the
tokenizer adds one itself, so encoding the prompt the usual way gives exactly one BOS. Special
tokens written in the text ("<|im_end|>", "</s>") become their ids in `Tokenizer.encode`.
"""

from __future__ import annotations

import json
from datetime import datetime

from llamaexport import LlamaExportError

FORMATS = ("auto", "template", "chatml", "llama2", "llama3", "alpaca", "gpt4-x-alpaca", "vicuna", "koala",
           "wizardlm", "oasst", "raw")
_NO_TEMPLATE = ("the tokenizer has no chat template; pick a format with --chat-format "
                f"({', '.join(FORMATS[2:])})")

ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
KOALA_SYSTEM = "BEGINNING OF CONVERSATION:"

# Text a model may write when it runs on past its turn. Markers that are special tokens are
# listed too, so a caller can turn them into stop ids with `Tokenizer.token_to_id`.
_STOP_STRINGS = {
    "chatml": ["<|im_end|>"],
    "llama2": ["[INST]"],
    "llama3": ["<|eot_id|>"],
    "alpaca": ["### Instruction:"],
    "gpt4-x-alpaca": ["### Instruction:"],
    "vicuna": ["USER:"],
    "koala": ["USER:"],
    "wizardlm": ["### Response:"],  # no user marker: a reply that runs on invents the next exchange
    "oasst": ["<|prompter|>"],
}


def format_chat(messages: list[dict], *, tokenizer=None, fmt: str = "auto", system: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """Render `messages` ({"role", "content"} dicts) as one prompt string in format `fmt`.

    fmt: "auto" uses the tokenizer's chat template, or failing that ChatML / LLaMA-3 when the
    vocabulary has their marker tokens; "template" uses the chat template only; the others are
    fixed formats (see FORMATS). `system` replaces a leading system message, or is put first.
    `add_generation_prompt` ends the text with the opening of the assistant's turn.
    """
    check_format(fmt)
    messages = _normalized(messages, system)
    fmt = resolve_format(fmt, tokenizer)
    if fmt == "template":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise LlamaExportError(_NO_TEMPLATE)
        text = render_template(template, messages, tokenizer=tokenizer,
                               add_generation_prompt=add_generation_prompt)
    else:
        text = _BUILTIN[fmt](messages, tokenizer, add_generation_prompt)
    return without_bos(text, tokenizer)


def resolve_format(fmt: str, tokenizer=None) -> str:
    """The format `format_chat` renders `fmt` with: "auto" becomes "template" when the tokenizer has a chat
    template, else the fixed format its vocabulary's markers name; other names are checked and kept."""
    check_format(fmt)
    return _auto_format(tokenizer) if fmt == "auto" else fmt


def without_bos(text: str, tokenizer) -> str:
    """`text` without a leading BOS token when the tokenizer adds one itself on encoding (one BOS, not two)."""
    bos = getattr(tokenizer, "bos_token", "")
    if bos and getattr(tokenizer, "add_bos", False) and text.startswith(bos):
        return text[len(bos):]
    return text


def default_stop_strings(fmt: str) -> list[str]:
    """Strings that end the assistant's reply in format `fmt` (empty for "auto"/"template"/"raw")."""
    check_format(fmt)
    return list(_STOP_STRINGS.get(fmt, []))


def render_template(template: str, messages: list[dict], *, tokenizer=None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    """Render an HF chat template the way transformers' `apply_chat_template` does.

    Templates come from model repos, so they run in jinja2's immutable sandbox with the same
    options, filters and globals as HF (trim_blocks, lstrip_blocks, loop controls, tojson,
    raise_exception, strftime_now). `tools` (OpenAI's list of {"type": "function", "function": ...})
    becomes the template's `tools` variable, as HF passes it; without it the variable is left undefined.
    """
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    special = {}
    if tokenizer is not None:
        special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
        if tokenizer.pad_id is not None:
            special["pad_token"] = tokenizer.id_to_piece(tokenizer.pad_id)
    try:
        extra = {} if tools is None else {"tools": tools}
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special, **extra)
    except jinja2.TemplateError as e:
        raise LlamaExportError(f"chat template failed: {e}; fix the messages or pick another "
                               "--chat-format") from None


def check_format(fmt):
    """Raise the one error for a name that is not in FORMATS."""
    if fmt not in FORMATS:
        raise LlamaExportError(f"unknown chat format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def _normalized(messages, system):
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LlamaExportError(f"bad chat message {m!r}; each must be "
                                   "{'role': 'user'|'assistant'|'system', 'content': str}")
        out.append({"role": m["role"], "content": m["content"]})
    if system is not None:
        if out and out[0]["role"] == "system":
            out = out[1:]
        out.insert(0, {"role": "system", "content": system})
    return out


def _auto_format(tokenizer):
    if getattr(tokenizer, "chat_template", None):
        return "template"
    if tokenizer is not None:  # no template, but the vocabulary tells which format it was made for
        for marker, fmt in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("<|prompter|>", "oasst")):
            if tokenizer.token_to_id(marker) is not None:
                return fmt
    raise LlamaExportError(_NO_TEMPLATE)


def _split_system(messages, default=None):
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages


def _require_alternating(turns, fmt):
    roles = [m["role"] for m in turns]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2):
        raise LlamaExportError(f"{fmt} chat needs user/assistant turns in order after an optional "
                               f"system message, got roles {roles}")


def _chatml(messages, tokenizer, gen):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if gen else "")


def _llama3(messages, tokenizer, gen):
    # Meta's ChatFormat: a header per message, content stripped, <|eot_id|> after each.
    header = "<|start_header_id|>{}<|end_header_id|>\n\n".format
    text = "".join(header(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in messages)
    return text + (header("assistant") if gen else "")


def _llama2(messages, tokenizer, gen):
    # Meta's chat_completion: the system prompt goes inside the first [INST]; each finished
    # exchange is "[INST] user [/INST] answer " + EOS, and the next one starts with BOS.
    bos = getattr(tokenizer, "bos_token", "") or "<s>"
    eos = getattr(tokenizer, "eos_token", "") or "</s>"
    system, turns = _split_system(messages)
    if system is not None and turns:
        turns = [{**turns[0], "content": f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0]['content']}"}] + turns[1:]
    _require_alternating(turns, "llama2")
    parts = []
    for i in range(0, len(turns), 2):
        part = f"[INST] {turns[i]['content'].strip()} [/INST]"
        if i + 1 < len(turns):
            part += f" {turns[i + 1]['content'].strip()} {eos}"
        parts.append(part)
    return bos.join(parts)  # the first BOS is added by the tokenizer


def _alpaca(messages, tokenizer, gen):
    # Alpaca's blocks (tatsu-lab/stanford_alpaca train.py PROMPT_DICT["prompt_no_input"], which ends at
    # "### Response:" where this adds a newline), turns in the same blocks. GPT4-x-Alpaca was fine-tuned
    # on GPT-4 answers in Alpaca's format, so "gpt4-x-alpaca" is this same text.
    system, turns = _split_system(messages, ALPACA_SYSTEM)
    head = {"user": "### Instruction:\n", "assistant": "### Response:\n"}
    text = system + "\n\n" + "".join(head.get(m["role"], "") + m["content"] + "\n\n" for m in turns)
    return text + ("### Response:\n" if gen else "")


def _colon_two(messages, tokenizer, gen, *, system, roles):
    # FastChat's SeparatorStyle.ADD_COLON_TWO with sep " " and sep2 EOS: the system prompt (which
    # replaces the default), then "USER: x " and "ROLE: y</s>" in turn, ending "ROLE:".
    eos = getattr(tokenizer, "eos_token", "") or "</s>"
    system, turns = _split_system(messages, system)
    user, assistant = roles
    text = system + " " + "".join(f"{user}: {m['content']} " if m["role"] == "user"
                                  else f"{assistant}: {m['content']}{eos}" for m in turns)
    return text + (f"{assistant}:" if gen else "")


def _vicuna(messages, tokenizer, gen):
    # FastChat's vicuna_v1.1 (lm-sys/FastChat fastchat/conversation.py).
    return _colon_two(messages, tokenizer, gen, system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"))


def _koala(messages, tokenizer, gen):
    # FastChat's koala_v1 (lm-sys/FastChat fastchat/conversation.py): "BEGINNING OF CONVERSATION:" is its
    # system message, so a system prompt replaces it. The first turn is exactly the prompt BAIR served Koala
    # with (young-geng/EasyLM docs/koala.md, EasyLM/serving.py). For a past reply EasyLM's server writes
    # "GPT:reply</s>" (the reply's text, decoded apart, lost its leading space); FastChat's "GPT: reply</s>"
    # is kept: it gives the reply the leading "▁" token it has when encoded as a text field of its own, as
    # EasyLM's TextProcessor (EasyLM/data.py) encodes training examples.
    return _colon_two(messages, tokenizer, gen, system=KOALA_SYSTEM, roles=("USER", "GPT"))


def _wizardlm(messages, tokenizer, gen):
    # WizardLM-7B-V1.0 (LLaMA-1): "{instruction}\n\n### Response:", the reply right after the colon and
    # then EOS (nlpxucan/WizardLM WizardLM/README.md, WizardLM/src/train_freeform.py PROMPT_DICT). It was
    # trained on single exchanges and has no system prompt; here a system prompt goes before the first
    # instruction ("{system}\n\n"), and each further exchange follows the EOS with a BOS, so every exchange
    # tokenizes as one training example. WizardLM-13B-V1.0, -30B-V1.0 and the later WizardLM-13B-V1.1/V1.2
    # and -70B-V1.0 use Vicuna's format (README.md, WizardLM/src/infer_wizardlm13b.py): pick "vicuna".
    bos = getattr(tokenizer, "bos_token", "") or "<s>"
    eos = getattr(tokenizer, "eos_token", "") or "</s>"
    system, turns = _split_system(messages)
    _require_alternating(turns, "wizardlm")
    text = "" if system is None else f"{system}\n\n"  # before the first instruction
    text += "".join((bos if i else "") + f"{m['content']}\n\n" if m["role"] == "user"
                   else f"### Response:{m['content']}{eos}" for i, m in enumerate(turns))
    return text + ("### Response:" if gen else "")


def _oasst(messages, tokenizer, gen):
    # OpenAssistant's SFT models (LLaMA-based oasst-sft-6/7-llama-30b): "<|prompter|>x</s><|assistant|>y</s>",
    # an optional "<|system|>sys</s>" first (LAION-AI/Open-Assistant model/MESSAGE_AND_TOKEN_FORMAT.md,
    # model/model_training/custom_datasets/formatting.py DatasetEntrySft; FastChat's oasst_llama is the same
    # but puts a system prompt in front bare). EOS is the tokenizer's (</s>; <|endoftext|> for Pythia ones).
    eos = getattr(tokenizer, "eos_token", "") or "</s>"
    system, turns = _split_system(messages)
    text = f"<|system|>{system}{eos}" if system else ""  # left out when empty, as OA does
    text += "".join(f"<|prompter|>{m['content']}{eos}" if m["role"] == "user"
                    else f"<|assistant|>{m['content']}{eos}" for m in turns)
    return text + ("<|assistant|>" if gen else "")


def _raw(messages, tokenizer, gen):
    return "\n".join(m["content"] for m in messages)


_BUILTIN = {"chatml": _chatml, "llama2": _llama2, "llama3": _llama3, "alpaca": _alpaca, "gpt4-x-alpaca": _alpaca,
            "vicuna": _vicuna, "koala": _koala, "wizardlm": _wizardlm, "oasst": _oasst, "raw": _raw}
