"""Tokenizers for the runtime: one interface over sentencepiece and HF `tokenizers`.

A tokenizer comes from a `tokenizer.model` (sentencepiece), a `tokenizer.json` (HF tokenizers),
a directory holding either with HF's side files, or the vocabulary embedded in a GGUF:

    tok = load_tokenizer("SmolLM2-135M-Instruct/")
    ids = tok.encode("Hello")            # BOS prepended when the tokenizer says so
    tok.save("out/")                     # tokenizer.json or tokenizer.model + tokenizer_config.json

Torch-free: only tokenizers and sentencepiece are imported, and `gguf` only to read a GGUF.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llamaexport import LlamaExportError

CONFIG_FILE = "tokenizer_config.json"
# Chat templates close a turn with one of these; a model trained on the template stops on it.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
# GGUF / sentencepiece token types (llama.cpp copied sentencepiece's numbering).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp has them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as one printable character (`bytes_to_unicode`): the bytes that
    are printable Latin-1 as themselves, the others as chr(256 + n) in byte order. This is the inverse map."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_OF_CHAR = _byte_level_chars()
_GGUF_PRE = {"default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "smollm": "smollm",
             "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3"}


class Tokenizer:
    """One interface over sentencepiece (tokenizer.model) and HF tokenizers (tokenizer.json).

    Subclasses supply `_encode` (text -> ids, no BOS), `decode`, `id_to_piece`, `token_to_id`,
    `_token_bytes`, `_adds_bos` and `_save_vocab`; this class holds the special ids and the chat template.
    """

    vocab_size: int

    def __init__(self, *, bos_id: int | None, eos_ids: list[int], pad_id: int | None,
                 add_bos: bool, chat_template: str | None = None):
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(eos_ids))  # ordered, no duplicates
        self.pad_id = pad_id
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_template = chat_template

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, add_bos={self.add_bos})")

    @property
    def bos_token(self) -> str:
        return "" if self.bos_id is None else self.id_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self.id_to_piece(self.eos_ids[0]) if self.eos_ids else ""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for in the text, on its own: a byte-level BPE token's bytes, a
        sentencepiece piece with "\u2581" as a space (a byte-fallback piece <0xNN> is its one byte), a special
        token's text (e.g. b"<|im_end|>"). An id past the vocabulary (a model's padded embedding rows) is
        b"". Logprobs report a token as these bytes (and as their text, decoded with errors="replace":
        a token holding part of a UTF-8 character is not text on its own)."""
        cache = self.__dict__.setdefault("_bytes_cache", {})
        token_id = int(token_id)
        if token_id not in cache:
            cache[token_id] = self._token_bytes(token_id) if 0 <= token_id < self.vocab_size else b""
        return cache[token_id]

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. "<|im_start|>") become their ids.

        BOS is prepended when `add_bos` (default: the tokenizer's own `add_bos`) is true.
        """
        ids = self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def save(self, out_dir) -> list[str]:
        """Write the vocabulary file and `tokenizer_config.json` into `out_dir`; return their names.

        The config has HF's keys (so transformers can load the directory too) plus a
        "llamaexport" record with the exact special ids, which `load_tokenizer` prefers.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vocab_file, hf_keys = self._save_vocab(out)
        piece = lambda i: None if i is None else self.id_to_piece(i)  # noqa: E731
        config = {
            **hf_keys,
            "bos_token": piece(self.bos_id),
            "eos_token": piece(self.eos_ids[0]) if self.eos_ids else None,
            "pad_token": piece(self.pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "chat_template": self.chat_template,
            "llamaexport": {"bos_id": self.bos_id, "eos_ids": self.eos_ids, "pad_id": self.pad_id,
                            "add_bos": self.add_bos},
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        return [vocab_file, CONFIG_FILE]


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (LLaMA-1/2 `tokenizer.model`, or one rebuilt from a GGUF)."""

    def __init__(self, processor, **special):
        """Wrap a SentencePieceProcessor; `special` overrides the model's own bos/eos/pad ids."""
        self._sp = processor
        self.vocab_size = processor.get_piece_size()
        # Control pieces and <unk> written in the text are read as those tokens, and the text
        # between them is encoded on its own (dummy prefix included). This equals Meta's
        # reference, which encodes each turn separately, and HF's LlamaTokenizer(legacy=True).
        specials = [processor.id_to_piece(i) for i in range(self.vocab_size)
                    if processor.is_control(i) or processor.is_unknown(i)]
        specials.sort(key=len, reverse=True)  # longest first, so "<s>" never cuts "<s_x>"
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        own = lambda i: i if i >= 0 else None  # noqa: E731  (sentencepiece says -1 for "none")
        super().__init__(**{"bos_id": own(processor.bos_id()), "pad_id": own(processor.pad_id()),
                            "eos_ids": [i for i in [processor.eos_id()] if i >= 0],
                            "add_bos": True, **special})

    @property
    def processor(self):
        """The wrapped sentencepiece.SentencePieceProcessor (read it, do not change it)."""
        return self._sp

    def _encode(self, text):
        if self._special_re is None:
            return self._sp.encode(text)
        ids = []
        for i, part in enumerate(self._special_re.split(text)):  # odd parts are special pieces
            if i % 2:
                ids.append(self._sp.piece_to_id(part))
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Text of `ids`; with `skip_special=False` control tokens are written as their pieces.
        Ids past the vocabulary (a model's padded embedding rows) have no text and are dropped."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        special = lambda i: self._sp.is_control(i) or self._sp.is_unknown(i)  # noqa: E731
        if skip_special:  # as HF does; sentencepiece itself would write <unk> as " ⁇ "
            return self._sp.decode([i for i in ids if not special(i)])
        out, run = [], []
        for i in ids + [None]:
            if i is None or special(i):
                out.append(self._sp.decode(run))
                run = []
                if i is not None:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def _token_bytes(self, token_id: int) -> bytes:
        sp, piece = self._sp, self._sp.id_to_piece(token_id)
        if sp.is_byte(token_id):  # <0x0A> -> b"\n"
            return bytes([int(piece[3:5], 16)])
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            return piece.encode()
        return piece.replace("\u2581", " ").encode()  # "\u2581" is sentencepiece's space

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk_id for an unknown piece
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def _adds_bos(self):
        return True  # LLaMA-1/2 were trained with BOS on every sequence

    def _save_vocab(self, out):
        (out / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        return "tokenizer.model", {"tokenizer_class": "LlamaTokenizer", "legacy": True}  # see __init__


class HFTokenizer(Tokenizer):
    """An HF `tokenizers.Tokenizer` (a `tokenizer.json`, or byte-level BPE rebuilt from a GGUF)."""

    def __init__(self, backend, **special):
        """Wrap a `tokenizers.Tokenizer`; `special` gives bos/eos/pad ids.

        By default BOS is the token the tokenizer.json post-processor puts first, if any (LLaMA-3).
        """
        self._hf = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        plain, full = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
        self._post_bos = full[0] if full[1:len(plain) + 1] == plain else None
        super().__init__(**{"bos_id": self._post_bos, "eos_ids": [], "pad_id": None,
                            "add_bos": self._post_bos is not None, **special})

    @property
    def backend(self):
        """The wrapped tokenizers.Tokenizer (read it, do not change it)."""
        return self._hf

    def _encode(self, text):
        # BOS/EOS come from Tokenizer.encode, not from the tokenizer.json post-processor
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Text of `ids`; with `skip_special=False` special tokens are kept in the text.
        Ids past the vocabulary (a model's padded embedding rows) have no text and are dropped."""
        return self._hf.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size],
                               skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str:
        return self._hf.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def _token_bytes(self, token_id: int) -> bytes:
        if not hasattr(self, "_pieces"):  # once: how this vocabulary writes bytes in its pieces
            spec = json.loads(self._hf.to_str())
            added = self._hf.get_added_tokens_decoder()
            self._pieces = ({i: t.content for i, t in added.items()},
                            "ByteLevel" in json.dumps(spec.get("decoder")),
                            bool((spec.get("model") or {}).get("byte_fallback")))
        added, byte_level, byte_fallback = self._pieces
        if token_id in added:  # special and added tokens are their text
            return added[token_id].encode()
        piece = self._hf.id_to_token(token_id)
        if piece is None:
            return b""
        if byte_level:  # GPT-2's byte-to-character map, undone
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()  # a sentencepiece-style vocabulary (Metaspace)

    def _adds_bos(self):
        return self._post_bos is not None and self._post_bos == self.bos_id

    def _save_vocab(self, out):
        self._hf.save(str(out / "tokenizer.json"))
        return "tokenizer.json", {"tokenizer_class": "PreTrainedTokenizerFast"}


def load_tokenizer(path) -> Tokenizer:
    """Load a tokenizer from a tokenizer.model, a tokenizer.json, a .gguf, or a directory.

    A directory (or the directory of a given file) may hold HF's tokenizer_config.json,
    special_tokens_map.json, generation_config.json and chat_template.jinja, which give the
    BOS/EOS tokens, `add_bos_token` and the chat template. tokenizer.json wins over
    tokenizer.model when a directory has both, as in HF.
    """
    path = Path(path)
    if not path.exists():
        raise LlamaExportError(f"tokenizer not found: {path}; pass a tokenizer.model, "
                               "tokenizer.json, .gguf file or a directory holding one")
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            raise LlamaExportError(f"no tokenizer.json or tokenizer.model in {path}; "
                                   "pass the model's tokenizer file or directory")
        path = found[0]
    config = _read_hf_config(path.parent)
    try:
        if path.suffix == ".json":
            import tokenizers

            tok = HFTokenizer(tokenizers.Tokenizer.from_file(str(path)))
        else:
            import sentencepiece

            tok = SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_file=str(path)))
    except Exception as e:  # a truncated or foreign file fails deep inside the library
        raise LlamaExportError(f"cannot read tokenizer {path} ({e}); "
                               "check the file is a valid tokenizer.json / tokenizer.model") from None
    _apply_hf_config(tok, config)
    return tok


def _read_hf_config(directory: Path) -> dict:
    """Merge HF's tokenizer side files in `directory` into one dict (missing files are fine)."""
    def read(name):
        f = directory / name
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LlamaExportError(f"cannot parse {f} ({e}); fix or remove the file") from None

    config = {**read("special_tokens_map.json"), **read(CONFIG_FILE)}
    config["generation"] = read("generation_config.json")
    template = config.get("chat_template") or read("chat_template.json").get("chat_template")
    if (directory / "chat_template.jinja").is_file():  # where newer transformers save it
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    config["chat_template"] = template
    return config


def _apply_hf_config(tok: Tokenizer, config: dict):
    """Set bos/eos/pad ids, add_bos and the chat template from an HF-style config dict."""
    tok.chat_template = template = config.get("chat_template")
    if "llamaexport" in config:  # written by Tokenizer.save: exact, nothing to infer
        record = config["llamaexport"]
        tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos = (
            record["bos_id"], record["eos_ids"], record["pad_id"], record["add_bos"])
        return

    def token_id(value):
        if isinstance(value, dict):  # a serialized AddedToken
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    generation = config["generation"]
    gen_eos = generation.get("eos_token_id")
    eos = [token_id(config.get("eos_token")), *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
    eos += [tok.token_to_id(t) for t in END_OF_TURN if template and t in template]
    tok.eos_ids = list(dict.fromkeys(i for i in eos if i is not None)) or tok.eos_ids
    tok.bos_id = _first(token_id(config.get("bos_token")), generation.get("bos_token_id"), tok.bos_id)
    tok.pad_id = _first(token_id(config.get("pad_token")), generation.get("pad_token_id"), tok.pad_id)
    add_bos = config.get("add_bos_token")
    tok.add_bos = tok.bos_id is not None and (tok._adds_bos() if add_bos is None else bool(add_bos))


def _first(*values):
    return next((v for v in values if v is not None), None)


def tokenizer_from_gguf(path) -> Tokenizer:
    """Rebuild the tokenizer embedded in a GGUF's metadata (`tokenizer.ggml.*` keys).

    "gpt2" vocabularies (byte-level BPE: SmolLM2, LLaMA-3) become an HF tokenizers BPE with the
    pre-tokenizer named by `tokenizer.ggml.pre`; "llama" vocabularies (sentencepiece BPE with byte
    fallback: LLaMA-1/2) become a sentencepiece model, which `save()` writes as tokenizer.model.
    """
    try:
        import gguf
    except ImportError:
        raise LlamaExportError("reading a GGUF needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise LlamaExportError(f"cannot read GGUF {path} ({e}); check the file is complete") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise LlamaExportError(f"{path} has no embedded vocabulary; pass --tokenizer with the "
                               "model's tokenizer.json or tokenizer.model")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    template = meta.get("tokenizer.chat_template")
    get = lambda key: meta.get(f"tokenizer.ggml.{key}")  # noqa: E731
    index = {t: i for i, t in enumerate(tokens)}
    eos = [get("eos_token_id"), get("eot_token_id"), get("eom_token_id")]
    eos += [index.get(t) for t in END_OF_TURN if template and t in template]
    special = {
        "bos_id": get("bos_token_id"),
        "eos_ids": [i for i in eos if i is not None],
        "pad_id": get("padding_token_id"),
        # llama.cpp's default when the key is absent: BOS for sentencepiece, none for BPE
        "add_bos": kind == "llama" if get("add_bos_token") is None else get("add_bos_token"),
        "chat_template": template,
    }
    if kind == "gpt2":
        return HFTokenizer(_byte_level_bpe(tokens, types, get("merges"), get("pre") or "default"),
                           **special)
    if kind == "llama":
        return SentencePieceTokenizer(_sentencepiece(meta, tokens, types), **special)
    raise LlamaExportError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and "
                           "'llama'); pass --tokenizer with the model's tokenizer.json")


def _byte_level_bpe(tokens, types, merges, pre):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    if pre not in _GGUF_PRE:
        raise LlamaExportError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
                               f"{', '.join(sorted(_GGUF_PRE))}); pass --tokenizer with the "
                               "model's tokenizer.json")
    if not merges:
        raise LlamaExportError("GGUF byte-level vocabulary has no tokenizer.ggml.merges; "
                               "pass --tokenizer with the model's tokenizer.json")
    style = _GGUF_PRE[pre]
    # llama.cpp (and LLaMA-3's tokenizer.json) look a whole word up in the vocab before merging
    model = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges],
                       ignore_merges=style == "llama3")
    backend = Backend(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style != "llama3")
    if style == "smollm":  # digits one by one, then GPT-2's regex (SmolLM2's tokenizer.json)
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif style == "llama3":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    # Control and user-defined tokens are matched whole in the text, never cut into bytes.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED])
    return backend


def _sentencepiece(meta, tokens, types):
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = BYTE in types
    for name in ("unk", "bos", "eos", "pad"):  # the processor finds these pieces by name
        key = "padding" if name == "pad" else "unknown" if name == "unk" else name
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        setattr(trainer, f"{name}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(trainer, f"{name}_piece", tokens[token_id])
    # LLaMA's tokenizer.model: no normalization, spaces kept, "▁" prepended to the text
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception as e:
        raise LlamaExportError(f"GGUF sentencepiece vocabulary is malformed ({e}); "
                               "pass --tokenizer with the model's tokenizer.model") from None


class StreamDecoder:
    """Incremental detokenizer: `push` generated ids one by one, print what it returns.

    Each step decodes a short window of ids twice, with and without the new id, and returns the
    difference, so sentencepiece's leading space and multi-token characters come out as
    `decode(all ids)` would write them. Text ending in U+FFFD (a UTF-8 character still missing
    bytes) is held back until it completes. `context` (e.g. the prompt's ids) is not printed but
    decides whether the first generated word gets its leading space.
    """

    def __init__(self, tokenizer: Tokenizer, *, context=(), skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids = [int(i) for i in context][-8:]  # a few ids settle spaces and split bytes
        self.prefix = 0               # decode windows start here
        self.read = len(self.ids)     # ids before this are already printed

    def _text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly printable text (maybe empty)."""
        self.ids.append(int(token_id))
        done = self._text(self.ids[self.prefix:self.read])
        text = self._text(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character prints as U+FFFD)."""
        done = self._text(self.ids[self.prefix:self.read])
        text = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


class TextStream:
    """Generated ids -> printable text, cut at the first stop string. Text that could still grow
    into a stop string is held back until it cannot."""

    def __init__(self, tokenizer, *, context=(), stop=(), skip_special: bool = True):
        self.dec = StreamDecoder(tokenizer, context=context, skip_special=skip_special)
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text now safe to show. Sets `stopped` at a stop string."""
        self.text += self.dec.push(token_id)
        hits = [j for j in (self.text.find(s) for s in self.stop) if j >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def finish(self) -> str:
        """The rest of the text (after EOS, the length limit or a stop string)."""
        if not self.stopped:
            self.text += self.dec.flush()
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece
