"""Tokenizer tier: our ids and text equal the reference libraries' on a varied text set.

References: transformers' own GGUF tokenizer (SmolLM2, byte-level BPE), sentencepiece itself and
transformers' LlamaTokenizer (a tiny byte-fallback BPE trained here), and a GGUF "llama" vocab
written with gguf.GGUFWriter from that model.
"""

import json

import pytest
from conftest import train_tiny_spm

from llamaexport import LlamaExportError
from llamaexport.model.tokenizer import SentencePieceTokenizer, StreamDecoder, load_tokenizer, tokenizer_from_gguf

TEXTS = [
    "Hello world", "the quick brown fox", " leading space", "trailing  ", "multiple    spaces",
    "a\nb\n\n\nc", "\ttab\t\tx", "12345 3.14159 1,000,000", "def f(x):\n    return x**2  # sq\n",
    "café naïve Ærø Ünïcödé", "日本語のテキスト 中文", "emoji 😀👍🏽 🇫🇷", "I'm you'll THEY'RE",
    "a  \n  b", "don't  stop!!!\r\n\r\nok", "", " ", "\n",
]
CHATML_TEXTS = ["<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|>y", "<|im_end|><|im_start|>"]
SPM_SPECIAL_TEXTS = ["<s>hello</s>", "x</s><s>[INST] y [/INST]", "<unk>z"]
STREAM_TEXT = "Streaming 😀👍🏽 日本語 café\n  done"


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_ref(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A directory laid out like a LLaMA-2 repo: tokenizer.model + tokenizer_config.json."""
    out = tmp_path_factory.mktemp("spm")
    train_tiny_spm(out)
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "legacy": True}))
    return out


@pytest.fixture(scope="module")
def sp(spm_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, sp):
    """The tiny sentencepiece model's vocab written as a GGUF "llama" tokenizer."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny-spm.gguf"
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- GGUF "gpt2" (byte-level BPE): SmolLM2 ---------------------------------------------------


def test_gguf_gpt2_matches_transformers(smol, smol_ref):
    for text in TEXTS + CHATML_TEXTS:
        ids = smol.encode(text)
        assert ids == smol_ref(text).input_ids, text
        assert smol.decode(ids) == smol_ref.decode(ids, skip_special_tokens=True), text
        assert smol.decode(ids, skip_special=False) == smol_ref.decode(ids), text


def test_gguf_gpt2_special_ids(smol):
    assert (smol.vocab_size, smol.bos_id, smol.pad_id, smol.add_bos) == (49152, 1, 2, False)
    assert smol.eos_ids == [2] and smol.id_to_piece(2) == "<|im_end|>"  # SmolLM2 stops on <|im_end|>
    assert smol.token_to_id("<|im_start|>") == 1 and smol.token_to_id("no such token") is None
    assert "<|im_start|>" in smol.chat_template
    assert smol.encode("hi", add_bos=True)[0] == 1


def test_gguf_gpt2_save_roundtrip(smol, smol_ref, tmp_path):
    assert sorted(smol.save(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    again = load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_ids, again.pad_id, again.add_bos) == (1, [2], 2, False)
    assert again.chat_template == smol.chat_template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # the saved directory is HF-loadable
    for text in TEXTS + CHATML_TEXTS:
        assert again.encode(text) == smol.encode(text) == hf(text).input_ids, text


def test_gguf_llama_bpe_pre_tokenizer(smollm2_gguf, smol, smol_ref, tmp_path):
    """SmolLM2's vocab relabelled as LLaMA-3 ("llama-bpe" regex, add_bos) matches transformers."""
    gguf = pytest.importorskip("gguf")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(smollm2_gguf)).fields.items()}
    path = tmp_path / "llama-bpe.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(writer.add_context_length, 2048), (writer.add_embedding_length, 64),
                       (writer.add_block_count, 1), (writer.add_head_count, 1),
                       (writer.add_feed_forward_length, 128)]:  # transformers reads a model config too
        add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = tokenizer_from_gguf(path)
    ref = type(smol_ref).from_pretrained(str(tmp_path), gguf_file=path.name)
    assert ours.add_bos
    for text in TEXTS + CHATML_TEXTS:
        assert ours.encode(text) == ref(text).input_ids, text
    # the LLaMA-3 regex is in effect: it splits some texts differently from SmolLM2's
    assert any(ours.encode(t, add_bos=False) != smol.encode(t) for t in TEXTS)


# --- sentencepiece (tokenizer.model) and GGUF "llama" -----------------------------------------


def test_spm_matches_sentencepiece(spm_dir, sp):
    tok = load_tokenizer(spm_dir / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (400, 1, [2], True)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
    assert any(sp.is_byte(i) for i in tok.encode("😀"))  # byte fallback is exercised


def test_spm_matches_transformers_llama(spm_dir):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(spm_dir)
    ref = transformers.LlamaTokenizer.from_pretrained(str(spm_dir))  # legacy=True, add_bos_token from config
    # transformers' Metaspace skips the "▁" prefix when the text already starts with a space, where
    # sentencepiece (and LLaMA's training) adds it, so texts starting with whitespace differ there.
    texts = [t for t in TEXTS if t and not t[0].isspace()] + SPM_SPECIAL_TEXTS
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_spm_special_tokens_in_text(spm_dir, sp):
    """<s>/</s> written in the text become ids; the text between them is encoded on its own (Meta)."""
    tok = load_tokenizer(spm_dir)
    assert tok.encode("x</s><s>[INST] y") == [1, *sp.encode("x"), 2, 1, *sp.encode("[INST] y")]
    assert tok.decode(tok.encode("<s>hi</s>"), skip_special=False) == "<s><s>hi</s>"


def test_spm_gguf_matches_sentencepiece(spm_gguf, sp, tmp_path):
    tok = tokenizer_from_gguf(spm_gguf)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], True)  # add_bos: llama.cpp's default
    for text in TEXTS:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text
    assert tok.save(tmp_path)[0] == "tokenizer.model"
    again = load_tokenizer(tmp_path)
    assert all(again.encode(t) == tok.encode(t) for t in TEXTS + SPM_SPECIAL_TEXTS)


# --- HF side files and errors -------------------------------------------------------------------


def test_hf_directory_config(smol, tmp_path):
    """tokenizer.json + HF side files: eos from config, generation config and template; BOS probe."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    smol.save(tmp_path)
    backend = Backend.from_file(str(tmp_path / "tokenizer.json"))
    # LLaMA-3 style: no add_bos_token key, the post-processor prepends BOS
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|endoftext|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (1, [0, 5, 2], None, True)
    assert tok.chat_template.startswith("{% for m")
    assert tok.encode("hi there") == backend.encode("hi there").ids
    bare = tmp_path / "bare"  # a lone tokenizer.json: BOS is what its post-processor prepends
    bare.mkdir()
    backend.save(str(bare / "tokenizer.json"))
    tok = load_tokenizer(bare / "tokenizer.json")
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template) == (1, [], True, None)


def test_load_errors(tmp_path):
    with pytest.raises(LlamaExportError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(LlamaExportError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(LlamaExportError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)


# --- streaming ------------------------------------------------------------------------------------


@pytest.fixture(params=["gguf-gpt2", "sentencepiece"])
def any_tok(request, spm_dir):
    if request.param == "sentencepiece":
        return load_tokenizer(spm_dir)
    return request.getfixturevalue("smol")


def test_stream_decoder_equals_decode(any_tok):
    ids = any_tok.encode(STREAM_TEXT)
    stream = StreamDecoder(any_tok)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == any_tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in c for c in chunks)  # never half a character
    assert sum(1 for c in chunks if c) > 5         # and it does stream


def test_stream_decoder_context_keeps_leading_space(any_tok):
    prompt, full = any_tok.encode("the fox"), any_tok.encode("the fox jumps 😀 over")
    assert full[:len(prompt)] == prompt
    stream = StreamDecoder(any_tok, context=prompt)
    text = "".join(stream.push(i) for i in full[len(prompt):]) + stream.flush()
    assert text == " jumps 😀 over"  # decoding the new ids alone would lose sentencepiece's space


def test_token_bytes_join_to_the_text(any_tok):
    """A token's bytes (what logprobs report): byte-level BPE's undone character map, sentencepiece's pieces
    with "\u2581" as a space and <0xNN> as its byte; joined over a text's ids they are its UTF-8, split
    characters included; special tokens are their text; ids past the vocabulary are b""."""
    ids = any_tok.encode(STREAM_TEXT, add_bos=False)
    joined = b"".join(any_tok.token_bytes(i) for i in ids)
    dummy_prefix = b" " if isinstance(any_tok, SentencePieceTokenizer) else b""  # sentencepiece's "\u2581" before the text
    assert joined == dummy_prefix + STREAM_TEXT.encode()
    assert any(len(any_tok.token_bytes(i).decode("utf-8", errors="replace")) < len(any_tok.token_bytes(i))
               for i in ids)  # some tokens hold part of a character: not text on their own
    eos = any_tok.eos_ids[0]
    assert any_tok.token_bytes(eos) == any_tok.id_to_piece(eos).encode()
    assert any_tok.token_bytes(any_tok.vocab_size) == b"" and any_tok.token_bytes(-1) == b""
