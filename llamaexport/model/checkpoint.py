"""Checkpoint loading: Meta `consolidated.*.pth`, HF safetensors, GGUF, or seeded random weights.

Every loader returns a `Checkpoint`: the config and a lazy name -> float32 numpy mapping in the
canonical (Meta) layout. Tensors are read one at a time (memory-mapped), so a 65B checkpoint
never has to fit in RAM. Conventions are undone here and nowhere else:
  - Meta model-parallel shards are merged (column-parallel on dim 0, row-parallel and the
    LLaMA-1/2 embedding on dim 1, norms replicated), inferred from the expected full shapes;
  - HF's q/k rotary permutation is inverted back to Meta's interleaved order;
  - GGUF tensors are dequantized (llama.cpp already stores Meta's order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError
from llamaexport.model.config import LlamaConfig, config_for_size, config_from_hf, config_from_params_json, inside, read_config


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes of a model with this config."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (cfg.n_heads * hd, d),
            p + "attention.wk.weight": (cfg.n_kv_heads * hd, d),
            p + "attention.wv.weight": (cfg.n_kv_heads * hd, d),
            p + "attention.wo.weight": (d, cfg.n_heads * hd),
            p + "ffn_norm.weight": (d,),
            p + "feed_forward.w1.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d),
        })
    shapes["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    return shapes


class Weights(Mapping):
    """Lazy, strict mapping: canonical name -> float32 array, loaded on access and shape-checked."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], load: Callable[[str], np.ndarray], origin: str):
        self.shapes, self._load, self.origin = shapes, load, origin

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        a = np.asarray(self._load(name), dtype=np.float32)
        if a.shape != self.shapes[name]:
            raise LlamaExportError(
                f"{self.origin}: tensor {name} has shape {a.shape}, the config expects "
                f"{self.shapes[name]}; the checkpoint does not match its config")
        return a

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


@dataclasses.dataclass
class Checkpoint:
    config: LlamaConfig
    weights: Weights
    source: dict                  # for the manifest: {"kind", "path", "fingerprint"} or {"kind": "random", "seed"}
    tokenizer_path: str | None = None


# ----------------------------------------------------------------------------- helpers

def fingerprint(files: list[Path]) -> str:
    """A fast content fingerprint: sha256 over each file's name, size, first and last 4 MiB."""
    h = hashlib.sha256()
    for f in sorted(files):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(4 << 20))
            if size > 8 << 20:
                fh.seek(-(4 << 20), 2)
                h.update(fh.read())
    return "sha256-head-tail:" + h.hexdigest()[:32]


def _check_keys(found: set[str], shapes: dict, origin: str, fix: str):
    missing = sorted(set(shapes) - found)
    extra = sorted(found - set(shapes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s) e.g. {', '.join(extra[:3])}")
        raise LlamaExportError(f"{origin}: {'; '.join(parts)}; {fix}")


def _find_tokenizer(directory: Path) -> str | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        for cand in (directory / name, directory.parent / name):
            if cand.is_file():
                return str(cand if name == "tokenizer.model" else cand.parent)
    return None


# ----------------------------------------------------------------------------- random

def random_checkpoint(cfg: LlamaConfig, seed: int = 0) -> Checkpoint:
    """Seeded random weights. Each tensor has its own stream (seed, crc32(name)), so loading a
    tensor alone gives the same values as loading the whole model."""
    shapes = expected_shapes(cfg)

    def load(name: str) -> np.ndarray:
        shape = shapes[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        std = 0.02 if "tok_embeddings" in name or name == "output.weight" else shape[1] ** -0.5
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    return Checkpoint(cfg, Weights(shapes, load, f"random seed {seed}"),
                      {"kind": "random", "seed": seed})


# ----------------------------------------------------------------------------- Meta

def torch_load(path: Path):
    """A PyTorch state dict, loaded weights-only (a pickle with code in it is refused, never run), with one
    error line for a damaged file. Used for Meta shards and LoRA adapter .bin files."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        if isinstance(e, pickle.UnpicklingError) and ("not an allowed global" in str(e) or "is blocked" in str(e)):
            # the file is a complete pickle, but it holds objects or code beyond tensors, which
            # weights_only loading refuses to run (torch.load would execute them otherwise)
            raise LlamaExportError(
                f"{path.name} holds Python objects or code besides tensors, which weights-only loading refuses "
                "to run; if you trust its source, convert it to safetensors (load it yourself and save the "
                "state dict with safetensors.torch.save_file) and build from that") from None
        raise LlamaExportError(
            f"cannot read {path.name} ({type(e).__name__}); the file is corrupt or truncated, "
            "download it again") from None


def load_meta(directory: Path, *, vocab_size: int | None = None) -> Checkpoint:
    """Meta's layout: params.json + consolidated.00.pth [+ .01 ...] (model-parallel shards)."""
    params = directory / "params.json"
    shards = sorted(directory.glob("consolidated.*.pth"))
    if not params.is_file():
        raise LlamaExportError(f"{directory} has consolidated.*.pth but no params.json; copy it from the original download")
    nums = [int(re.search(r"consolidated\.(\d+)\.pth", s.name).group(1)) for s in shards]
    if nums != list(range(len(shards))):
        raise LlamaExportError(f"{directory}: shards {nums} are not consecutive from 00; a shard file is missing")
    states = [torch_load(s) for s in shards]
    if vocab_size is None:
        emb = states[0].get("tok_embeddings.weight")
        if emb is not None:  # the vocab lives on dim 0 (dim-1-sharded) or is split over the shards
            vocab_size = emb.shape[0] if len(states) == 1 or emb.shape[1] != states[0]["norm.weight"].shape[0] \
                else emb.shape[0] * len(states)
    cfg = config_from_params_json(params, vocab_size=vocab_size)
    shapes = expected_shapes(cfg)
    found = set().union(*(s.keys() for s in states)) - {"rope.freqs"}
    _check_keys(found, shapes, str(directory), "the shards do not match params.json")
    n = len(states)

    def load(name: str) -> np.ndarray:
        parts = [s[name] for s in states]
        full = shapes[name]
        if n == 1 or tuple(parts[0].shape) == full:  # single file, or replicated (norms)
            t = parts[0]
        else:
            axes = [a for a in range(len(full)) if parts[0].shape[a] * n == full[a]]
            if not axes:
                raise LlamaExportError(
                    f"{name}: shard shape {tuple(parts[0].shape)} x {n} shards cannot form {full}; "
                    "params.json does not match the shards")
            import torch
            t = torch.cat(parts, dim=axes[0])
        return t.float().numpy()

    tok = directory / "tokenizer.model"
    if not tok.is_file():
        tok = directory.parent / "tokenizer.model"
    return Checkpoint(cfg, Weights(shapes, load, str(directory)),
                      {"kind": "meta", "path": str(directory.resolve()), "fingerprint": fingerprint(shards + [params])},
                      str(tok) if tok.is_file() else None)


# ----------------------------------------------------------------------------- Hugging Face

_HF_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _rename(name: str, fixed: dict, layer_pattern: str, layer_table: dict) -> str:
    """Map a foreign tensor name to the canonical one; unknown names pass through unchanged
    (the strict key check then reports them as unexpected)."""
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(layer_pattern, name)
    if m and m.group(2) in layer_table:
        return f"layers.{m.group(1)}.{layer_table[m.group(2)]}.weight"
    return name


def hf_to_canonical(name: str) -> str | None:
    """HF LlamaForCausalLM parameter name -> canonical name (None for non-parameters)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return _rename(name, {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                          "lm_head.weight": "output.weight"}, r"model\.layers\.(\d+)\.(.+)\.weight", _HF_LAYER)


def unpermute_hf(w: np.ndarray, n_heads: int, head_dim: int, rope_dim: int) -> np.ndarray:
    """Undo HF's q/k permutation: per head, rows (halves layout) -> Meta's interleaved pairs."""
    out_dim, d = w.shape
    w = w.reshape(n_heads, head_dim, d)
    rot = w[:, :rope_dim].reshape(n_heads, 2, rope_dim // 2, d).transpose(0, 2, 1, 3)
    rot = rot.reshape(n_heads, rope_dim, d)
    return np.concatenate([rot, w[:, rope_dim:]], axis=1).reshape(out_dim, d)


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LlamaExportError(f"{index} is not a valid safetensors index ({e}); download it again") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise LlamaExportError(f"{index}: weight_map must map tensor names to file names; download it again")
        outside = [f for f in weight_map.values() if not inside(directory, f)]
        if outside:
            raise LlamaExportError(f"{index} names the shard {outside[0]!r}, outside {directory}; a checkpoint's "
                                   "files must be in its directory")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise LlamaExportError(f"{directory}: shard(s) {', '.join(absent)} named in the index are missing")
        return files
    return sorted(directory.glob("*.safetensors"))


def open_safetensors(path: Path):
    """A safe_open handle on a .safetensors file whose header was checked first (one error line for a
    truncated or damaged file). Used for HF checkpoints and LoRA adapters."""
    from safetensors import safe_open

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than a safetensors header")
            header_len = int.from_bytes(head, "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size < 8 + header_len + end:
            raise ValueError(f"file is {size} bytes, its header needs {8 + header_len + end}")
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001
        raise LlamaExportError(
            f"cannot read {path.name}: {str(e).splitlines()[0][:120]}; the file is corrupt or truncated, "
            "download it again") from None


def load_hf(directory: Path) -> Checkpoint:
    """HF layout: config.json + model.safetensors, or sharded with model.safetensors.index.json."""
    cfg = config_from_hf(directory / "config.json")
    files = _safetensors_files(directory)
    if not files:
        raise LlamaExportError(
            f"{directory} has config.json but no *.safetensors weights; convert .bin weights to safetensors first")
    handles = {f: open_safetensors(f) for f in files}
    where: dict[str, tuple[object, str]] = {}
    for h in handles.values():
        for key in h.keys():
            name = hf_to_canonical(key)
            if name is not None:
                where[name] = (h, key)
    if cfg.tie_embeddings:
        where.pop("output.weight", None)  # some exporters save the tied copy too
    shapes = expected_shapes(cfg)
    _check_keys(set(where), shapes, str(directory), "the weights do not match config.json")

    def load(name: str) -> np.ndarray:
        h, key = where[name]
        a = h.get_tensor(key).float().numpy()
        if name.endswith("attention.wq.weight"):
            a = unpermute_hf(a, cfg.n_heads, cfg.head_dim, cfg.rope_dim)
        elif name.endswith("attention.wk.weight"):
            a = unpermute_hf(a, cfg.n_kv_heads, cfg.head_dim, cfg.rope_dim)
        return a

    return Checkpoint(cfg, Weights(shapes, load, str(directory)),
                      {"kind": "hf", "path": str(directory.resolve()), "fingerprint": fingerprint(files)},
                      _find_tokenizer(directory))


# ----------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
GGUF_SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def gguf_to_canonical(name: str) -> str:
    return _rename(name, {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                          "output.weight": "output.weight"}, r"blk\.(\d+)\.(\w+)\.weight", _GGUF_LAYER)


def load_gguf(path: Path) -> Checkpoint:
    """A llama.cpp GGUF file (architecture `llama`): F32/F16/BF16/Q8_0/Q4_0/Q4_1/K-quants, dequantized."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise LlamaExportError("reading GGUF needs the `gguf` package: pip install 'llamaexport[build]'") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001
        raise LlamaExportError(
            f"cannot read {path.name}: {str(e).splitlines()[0][:120]}; the GGUF file is corrupt or truncated") from None

    def meta(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    need = [k for k in ("llama.attention.head_count", "llama.embedding_length", "llama.block_count",
                        "llama.feed_forward_length") if reader.fields.get(k) is None]
    if need and meta("general.architecture") == "llama":
        raise LlamaExportError(f"{path.name}: the GGUF metadata lacks {', '.join(need)}; the file is not a complete "
                               "llama GGUF (convert it again)")

    arch = meta("general.architecture")
    if arch != "llama":
        raise LlamaExportError(f"{path.name}: GGUF architecture {arch!r} is not supported; only llama")
    tensors = {gguf_to_canonical(t.name): t for t in reader.tensors}
    freqs = tensors.pop("rope_freqs.weight", None)  # llama3-style scaling stored as divisors
    tokens = meta("tokenizer.ggml.tokens")

    def make():
        n_heads = int(meta("llama.attention.head_count"))
        head_dim = meta("llama.attention.key_length")
        scaling = None
        if freqs is not None:
            scaling = {"rope_type": "freq_factors",
                       "factors": [float(v) for v in dequantize(freqs.data, freqs.tensor_type).reshape(-1)]}
        elif meta("llama.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(meta("llama.rope.scaling.factor"))}
        return LlamaConfig(
            dim=int(meta("llama.embedding_length")), n_layers=int(meta("llama.block_count")), n_heads=n_heads,
            n_kv_heads=int(meta("llama.attention.head_count_kv", n_heads)),
            vocab_size=int(meta("llama.vocab_size", len(tokens) if tokens else 32000)),
            ffn_dim=int(meta("llama.feed_forward_length")),
            norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
            head_dim=int(head_dim) if head_dim else None,
            rope_dim=int(meta("llama.rope.dimension_count")) if meta("llama.rope.dimension_count") else None,
            max_seq_len=int(meta("llama.context_length", 2048)),
            tie_embeddings="output.weight" not in tensors,
        )

    cfg = read_config(path.name, make)
    shapes = expected_shapes(cfg)
    _check_keys(set(tensors), shapes, path.name, "the GGUF tensors do not match its metadata")
    for t in tensors.values():
        if t.tensor_type.name not in GGUF_SUPPORTED:
            raise LlamaExportError(f"{path.name}: tensor {t.name} has type {t.tensor_type.name}; "
                                   f"supported: {', '.join(GGUF_SUPPORTED)}")

    def load(name: str) -> np.ndarray:
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).reshape(shapes[name])

    return Checkpoint(cfg, Weights(shapes, load, path.name),
                      {"kind": "gguf", "path": str(path.resolve()), "fingerprint": fingerprint([path])},
                      str(path) if tokens else None)


# ----------------------------------------------------------------------------- entry point

def load_checkpoint(source: str | Path | None = None, *, size: str | None = None, seed: int = 0,
                    max_seq_len: int | None = None) -> Checkpoint:
    """Load `source` (a Meta or HF directory, or a .gguf file), or random weights for `size`."""
    if (source is None) == (size is None):
        raise LlamaExportError("give exactly one of --checkpoint DIR or --size S")
    if size is not None:
        ckpt = random_checkpoint(config_for_size(size), seed)
    else:
        p = Path(source).expanduser()
        if not p.exists():
            raise LlamaExportError(f"checkpoint {p} does not exist; pass a Meta or HF directory or a .gguf file")
        if p.is_file() and p.suffix == ".gguf":
            ckpt = load_gguf(p)
        elif p.is_file():
            raise LlamaExportError(f"{p} is a file but not .gguf; pass the checkpoint directory instead")
        elif list(p.glob("consolidated.*.pth")):
            ckpt = load_meta(p)
        elif (p / "config.json").is_file():
            ckpt = load_hf(p)
        elif len(list(p.glob("*.gguf"))) == 1:
            ckpt = load_gguf(next(p.glob("*.gguf")))
        else:
            raise LlamaExportError(
                f"{p} holds no checkpoint: expected params.json + consolidated.*.pth (Meta), "
                "config.json + *.safetensors (Hugging Face), or one .gguf file")
    if max_seq_len is not None:  # validated by LlamaConfig (a positive whole number)
        ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, max_seq_len=max_seq_len))
    return ckpt
