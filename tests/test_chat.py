"""Chat formatting: HF chat templates render as transformers does, fixed formats give the
documented strings, and a LLaMA-2 chat tokenizes exactly as Meta's reference builds it."""

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import cli

from llamaexport import LlamaExportError
from llamaexport.model.chat import FORMATS, default_stop_strings, format_chat
from llamaexport.model.tokenizer import load_tokenizer, tokenizer_from_gguf

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you? 😀"}]
CONVERSATIONS = [CHAT[:1], [SYSTEM] + CHAT, CHAT[:2], [{"role": "user", "content": "多行\n  text\t"}]]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    """A tiny LLaMA-style sentencepiece model (the vocabulary hardly matters here)."""
    import sentencepiece

    out = tmp_path_factory.mktemp("spm")
    words = "INST SYS Be brief Hi Hello How are you system user assistant".split()
    (out / "corpus.txt").write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 20)
    sentencepiece.SentencePieceTrainer.train(
        input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), vocab_size=300, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    return out / "tokenizer.model"


def test_template_matches_transformers(smol, smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            prompt = format_chat(messages, tokenizer=smol, add_generation_prompt=gen)
            assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)["input_ids"]
            assert smol.encode(prompt) == ids
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chatml_builtin_equals_smollm2_template(smol):
    # SmolLM2's template is ChatML plus a default system message
    for messages in ([SYSTEM] + CHAT, CHAT[:2]):
        assert (format_chat(messages, fmt="chatml", system="Be brief.")
                == format_chat(messages, tokenizer=smol, system="Be brief."))
    assert format_chat(CHAT[:1], fmt="chatml") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_template = copy.copy(smol)
    no_template.chat_template = None  # "auto" then falls back on the vocabulary's ChatML markers
    assert format_chat(CHAT, tokenizer=no_template) == format_chat(CHAT, fmt="chatml")


def test_fixed_formats():
    assert format_chat(CHAT[:1], fmt="alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nHi\n\n### Response:\n")
    assert format_chat([SYSTEM] + CHAT, fmt="alpaca") == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n"
        "### Instruction:\nHow are you? 😀\n\n### Response:\n")
    assert format_chat(CHAT[:1], fmt="vicuna") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:")
    assert format_chat(CHAT, fmt="vicuna", system="Be brief.") == (
        "Be brief. USER: Hi ASSISTANT: Hello!</s>USER: How are you? 😀 ASSISTANT:")
    assert format_chat([SYSTEM] + CHAT, fmt="llama2") == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] How are you? 😀 [/INST]")
    assert format_chat([SYSTEM] + CHAT[:1], fmt="llama3") == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert format_chat(CHAT[:2], fmt="llama3", add_generation_prompt=False).endswith("Hello!<|eot_id|>")
    assert format_chat(CHAT, fmt="raw") == "Hi\nHello!\nHow are you? 😀"


def test_llama2_tokens_equal_meta_reference(spm_path):
    """Meta's chat_completion: BOS + "[INST] {sys+user} [/INST] {answer} " + EOS per exchange."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    tok = load_tokenizer(spm_path)
    first = "<<SYS>>\nBe brief.\n<</SYS>>\n\nHi"
    meta = ([sp.bos_id()] + sp.encode(f"[INST] {first} [/INST] Hello! ") + [sp.eos_id()]
            + [sp.bos_id()] + sp.encode("[INST] How are you? 😀 [/INST]"))
    assert tok.encode(format_chat([SYSTEM] + CHAT, tokenizer=tok, fmt="llama2")) == meta
    with pytest.raises(LlamaExportError, match="user/assistant"):
        format_chat([CHAT[1]], fmt="llama2")


def test_template_bos_is_not_doubled(spm_path):
    tok = load_tokenizer(spm_path)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    prompt = format_chat(CHAT[:1], tokenizer=tok)
    assert prompt == "[INST] Hi [/INST]"
    assert tok.encode(prompt).count(tok.bos_id) == 1
    tok.add_bos = False  # a tokenizer that does not add BOS keeps the template's
    assert format_chat(CHAT[:1], tokenizer=tok) == "<s>[INST] Hi [/INST]"


def test_template_errors_and_sandbox(spm_path):
    tok = load_tokenizer(spm_path)
    with pytest.raises(LlamaExportError, match="--chat-format"):
        format_chat(CHAT, tokenizer=tok)  # no template, no ChatML/LLaMA-3 markers
    with pytest.raises(LlamaExportError, match="--chat-format"):
        format_chat(CHAT, fmt="template")
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(LlamaExportError, match="roles must alternate"):
        format_chat(CHAT, tokenizer=tok)
    tok.chat_template = "{{ messages.__class__.__mro__ }}"  # templates are untrusted code
    with pytest.raises(LlamaExportError):
        format_chat(CHAT, tokenizer=tok)


def test_unknown_format_and_bad_messages():
    with pytest.raises(LlamaExportError) as e:
        format_chat(CHAT, fmt="mistral")
    assert "'mistral'" in str(e.value) and all(f in str(e.value) for f in FORMATS)
    with pytest.raises(LlamaExportError, match="unknown chat format"):
        default_stop_strings("mistral")
    with pytest.raises(LlamaExportError, match="bad chat message"):
        format_chat([{"role": "user"}], fmt="chatml")


def test_default_stop_strings():
    assert default_stop_strings("alpaca") == default_stop_strings("gpt4-x-alpaca") == ["### Instruction:"]
    assert default_stop_strings("vicuna") == default_stop_strings("koala") == ["USER:"]
    assert default_stop_strings("oasst") == ["<|prompter|>"]
    assert default_stop_strings("wizardlm") == ["### Response:"]
    assert default_stop_strings("chatml") == ["<|im_end|>"]
    assert default_stop_strings("raw") == default_stop_strings("auto") == []


# ---- the LLaMA-1 fine-tunes: Koala, WizardLM-7B, OpenAssistant, GPT4-x-Alpaca

def test_koala(spm_path):
    # BAIR's serving prompt, first round (young-geng/EasyLM docs/koala.md, "Koala Chatbot Prompts")
    assert format_chat([{"role": "user", "content": "Hello!"}], fmt="koala") == (
        "BEGINNING OF CONVERSATION: USER: Hello! GPT:")
    # FastChat's koala_v1 (lm-sys/FastChat fastchat/conversation.py: ADD_COLON_TWO, sep " ", sep2 "</s>";
    # these are its get_prompt() strings, a system prompt set with set_system_message)
    assert format_chat(CHAT[:1], fmt="koala") == "BEGINNING OF CONVERSATION: USER: Hi GPT:"
    assert format_chat([SYSTEM] + CHAT[:1], fmt="koala") == "Be brief. USER: Hi GPT:"
    assert format_chat(CHAT, fmt="koala") == (
        "BEGINNING OF CONVERSATION: USER: Hi GPT: Hello!</s>USER: How are you? 😀 GPT:")
    assert format_chat([SYSTEM] + CHAT, fmt="koala") == "Be brief. USER: Hi GPT: Hello!</s>USER: How are you? 😀 GPT:"
    assert format_chat(CHAT[:2], fmt="koala", add_generation_prompt=False) == (
        "BEGINNING OF CONVERSATION: USER: Hi GPT: Hello!</s>")
    # EasyLM's second round writes the past reply as "GPT:Hi!..." (decoded apart, it lost its space); the
    # space is kept here, so the reply's tokens are those of the reply encoded as a field of its own, as
    # EasyLM's TextProcessor (EasyLM/data.py) encodes training examples
    easylm = ("BEGINNING OF CONVERSATION: USER: Hello! GPT:Hi! How can I help you?</s>"
              "USER: What is the largest animal on earth? GPT:")
    two = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help you?"},
           {"role": "user", "content": "What is the largest animal on earth?"}]
    assert format_chat(two, fmt="koala") == easylm.replace("GPT:Hi!", "GPT: Hi!")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    tok = load_tokenizer(spm_path)
    fields = [sp.bos_id()] + sp.encode("BEGINNING OF CONVERSATION: USER: Hi GPT:") + sp.encode("Hello!") + [sp.eos_id()]
    assert tok.encode(format_chat(CHAT[:2], tokenizer=tok, fmt="koala", add_generation_prompt=False)) == fields


def test_wizardlm(spm_path):
    # nlpxucan/WizardLM WizardLM/README.md, "For WizardLM-7B-V1.0": "{instruction}\n\n### Response:"
    assert format_chat(CHAT[:1], fmt="wizardlm") == "Hi\n\n### Response:"
    # no system prompt or multi-turn form was published for the 7B: the system text goes first, and each
    # exchange is one training example (WizardLM/src/train_freeform.py: source + output + EOS, after BOS)
    assert format_chat([SYSTEM] + CHAT[:1], fmt="wizardlm") == "Be brief.\n\nHi\n\n### Response:"
    assert format_chat(CHAT, fmt="wizardlm") == "Hi\n\n### Response:Hello!</s><s>How are you? 😀\n\n### Response:"
    assert format_chat([SYSTEM] + CHAT, fmt="wizardlm") == (
        "Be brief.\n\nHi\n\n### Response:Hello!</s><s>How are you? 😀\n\n### Response:")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    tok = load_tokenizer(spm_path)
    examples = ([sp.bos_id()] + sp.encode("Hi\n\n### Response:Hello!") + [sp.eos_id()]
                + [sp.bos_id()] + sp.encode("How are you? 😀\n\n### Response:"))
    assert tok.encode(format_chat(CHAT, tokenizer=tok, fmt="wizardlm")) == examples
    with pytest.raises(LlamaExportError, match="wizardlm chat needs user/assistant turns"):
        format_chat([CHAT[0], CHAT[0]], fmt="wizardlm")


def test_oasst():
    # the OpenAssistant LLaMA SFT model cards' "Prompting" example
    meme = "What is a meme, and what's the history behind this word?"
    assert format_chat([{"role": "user", "content": meme}], fmt="oasst") == f"<|prompter|>{meme}</s><|assistant|>"
    # LAION-AI/Open-Assistant model/MESSAGE_AND_TOKEN_FORMAT.md, "Message Format v2-new" (its example closes
    # the system part with a second <|system|>, a typo: the format above it and formatting.py have the EOS)
    assert format_chat([{"role": "system", "content": "You are a large language model that wants to be helpful"},
                        {"role": "user", "content": "What is red and round?"},
                        {"role": "assistant", "content": "Hmm, a red balloon?"},
                        {"role": "user", "content": "No, smaller"}], fmt="oasst") == (
        "<|system|>You are a large language model that wants to be helpful</s><|prompter|>What is red and round?</s>"
        "<|assistant|>Hmm, a red balloon?</s><|prompter|>No, smaller</s><|assistant|>")
    # FastChat's oasst_llama (NO_COLON_SINGLE, sep "</s>") without a system prompt
    assert format_chat(CHAT, fmt="oasst") == (
        "<|prompter|>Hi</s><|assistant|>Hello!</s><|prompter|>How are you? 😀</s><|assistant|>")
    assert format_chat([SYSTEM] + CHAT[:1], fmt="oasst") == "<|system|>Be brief.</s><|prompter|>Hi</s><|assistant|>"
    assert format_chat([SYSTEM] + CHAT, fmt="oasst") == (
        "<|system|>Be brief.</s><|prompter|>Hi</s><|assistant|>Hello!</s><|prompter|>How are you? 😀</s><|assistant|>")
    # the EOS is the tokenizer's: FastChat's oasst_pythia for the Pythia models
    pythia = SimpleNamespace(eos_token="<|endoftext|>", bos_token="<|endoftext|>", add_bos=False, chat_template=None)
    assert format_chat(CHAT, tokenizer=pythia, fmt="oasst") == (
        "<|prompter|>Hi<|endoftext|><|assistant|>Hello!<|endoftext|><|prompter|>How are you? 😀<|endoftext|>"
        "<|assistant|>")
    # "auto" picks it for a vocabulary with OpenAssistant's markers and no chat template
    oa = SimpleNamespace(eos_token="</s>", bos_token="<s>", add_bos=True, chat_template=None,
                         token_to_id=lambda t: 32000 if t == "<|prompter|>" else None)
    assert format_chat(CHAT, tokenizer=oa) == format_chat(CHAT, fmt="oasst")


def test_gpt4_x_alpaca_is_alpaca():
    for messages in CONVERSATIONS + [[SYSTEM] + CHAT[:1]]:
        for gen in (True, False):
            assert (format_chat(messages, fmt="gpt4-x-alpaca", add_generation_prompt=gen)
                    == format_chat(messages, fmt="alpaca", add_generation_prompt=gen))


# ---- `build --chat-format`: recorded in the manifest, the default of run --chat, chat (serve: test_serve.py;
# an unknown one: test_bad_input.py)

def test_build_records_the_chat_format(tiny_artifact, tmp_path):
    from llamaexport.build.pipeline import build
    from llamaexport.runtime.llama_model import LlamaModel

    art = build(out=tmp_path / "koala", size="tiny", seed=7, tokenizer=str(tiny_artifact / "tokenizer.model"),
                chat_format="koala", progress=False)
    assert json.loads((art / "manifest.json").read_text())["chat_format"] == "koala"
    koala = "BEGINNING OF CONVERSATION: USER: Hi GPT:"
    with LlamaModel.load(art) as m:
        assert m.chat_format == "koala"
        assert m.format_prompt("Hi", chat=True) == koala
        assert m.format_prompt("Hi", chat="vicuna").endswith(" USER: Hi ASSISTANT:")  # a given format wins
        want = m.generate(koala, max_new_tokens=8, stop=["USER:"])
    with LlamaModel.load(tiny_artifact) as m:
        assert m.chat_format == "auto"  # built without one
    r = cli("run", art, "--prompt", "Hi", "--chat", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    r = cli("inspect", art)
    assert r.returncode == 0 and "chat format      koala" in r.stdout, r.stdout
    assert "chat format      auto (not recorded)" in cli("inspect", tiny_artifact).stdout
    r = subprocess.run([sys.executable, "-m", "llamaexport.cli", "chat", str(art), "--max-new-tokens", "4"],
                       input="/exit\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(koala format)" in r.stdout

