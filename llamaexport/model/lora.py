"""LoRA adapters (PEFT) merged into the base weights while they stream through the export.

`apply_lora(ckpt, dirs)` wraps a Checkpoint's lazy weights: loading a tensor gives the base tensor
plus each adapter's delta, scale * B @ A with scale = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora; rank_pattern / alpha_pattern per module), which is what peft's `merge_and_unload()`
adds (peft/tuners/lora/layer.py: Linear.get_delta_weight; Embedding.get_delta_weight transposes).
One tensor at a time, so a build needs no more memory than without the adapter.

An adapter directory (peft's PeftModel.save_pretrained, utils/save_and_load.py) holds
adapter_config.json and adapter_model.safetensors, or the older adapter_model.bin (a torch pickle,
read weights-only), and sometimes the tokenizer its fine-tune extended. Tensor keys are the trained
model's module names under `base_model.model.`, the adapter's name (`.default`) removed or not:
    <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r]
    <module>.lora_embedding_A [r, vocab], <module>.lora_embedding_B [dim, r]   (an embedding)
    <module>.weight | <module>.modules_to_save[.<name>].weight | <module>.base_layer.weight:
        a whole tensor (modules_to_save, a resized embedding) that replaces the base's; a resized
        embedding may come twice (both forms, equal) and with `.original_module.` (the base's copy,
        which the merged model drops)
Module names are HF's (model.layers.0.self_attn.q_proj) or Meta's (layers.0.attention.wq). HF's
q_proj/k_proj rows are in HF's rotary order, so their deltas are permuted back to Meta's here, as
the HF loader does with the weights themselves; the base's format does not matter (every loader
gives the canonical layout).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError, whole_number
from llamaexport.model.checkpoint import (
    Checkpoint,
    Weights,
    expected_shapes,
    fingerprint,
    hf_to_canonical,
    open_safetensors,
    torch_load,
    unpermute_hf,
)

CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft loads the first that exists

# Options whose merged model is not base + scale * B @ A: config key -> what it is called
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)", "use_qalora": "QA-LoRA (use_qalora)", "lora_bias": "a bias on lora_B (lora_bias)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)", "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)", "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)", "velora_config": "VeLoRA (velora_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}
# init_lora_weights values that leave the base alone; pissa, olora, corda, loftq and lora_ga train
# against a base peft modified (unless saved converted, which records `true`), mica changes the forward
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
PEFT_LLAMA_DEFAULT_TARGETS = ["q_proj", "v_proj"]  # peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

_HF_LINEAR = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3"}
_META = re.compile(r"tok_embeddings|norm|output|layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]|attention_norm|ffn_norm)")
_LORA = re.compile(r"(?P<module>.+?)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)")
_LORA_EMB = re.compile(r"(?P<module>.+?)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<name>[^.]+))?")


@dataclasses.dataclass
class _Delta:
    a: str            # tensor keys in the adapter file
    b: str
    scale: float
    embedding: bool   # delta = (B @ A).T
    heads: int | None  # HF rotary order: permute B's rows back with this many heads (q: n_heads, k: n_kv_heads)


class _Tensors:
    """An adapter file's tensors: shapes without reading them, float32 values on demand."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            h = open_safetensors(path)
            self.keys = list(h.keys())
            self.shape = lambda k: tuple(h.get_slice(k).get_shape())
            self._get = h.get_tensor
        else:
            sd = torch_load(path)  # weights_only: a pickle with code in it is refused, never run
            if not isinstance(sd, dict) or not all(hasattr(v, "float") and hasattr(v, "shape") for v in sd.values()):
                raise LlamaExportError(f"{path} does not hold a state dict of tensors; it is not a PEFT adapter file")
            self.keys = list(sd)
            self.shape = lambda k: tuple(sd[k].shape)
            self._get = sd.__getitem__

    def get(self, key: str) -> np.ndarray:
        return self._get(key).float().numpy()


# ----------------------------------------------------------------------------- reading an adapter

def adapter_files(directory) -> tuple[Path, Path]:
    """(adapter_config.json, the weights file) of an adapter directory, or one line saying what is missing."""
    d = Path(directory).expanduser()
    if not d.exists():
        raise LlamaExportError(f"LoRA adapter {d} does not exist; pass a PEFT adapter directory "
                               f"({CONFIG} + {WEIGHT_FILES[0]})")
    if not d.is_dir():
        raise LlamaExportError(f"LoRA adapter {d} is a file; pass the adapter's directory (the one holding {CONFIG})")
    if not (d / CONFIG).is_file():
        raise LlamaExportError(f"LoRA adapter {d} has no {CONFIG}; a PEFT adapter directory holds {CONFIG} and "
                               f"{WEIGHT_FILES[0]} (or {WEIGHT_FILES[1]})")
    weights = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if weights is None:
        raise LlamaExportError(f"LoRA adapter {d} has {CONFIG} but neither {WEIGHT_FILES[0]} nor {WEIGHT_FILES[1]}; "
                               "copy the adapter's weights file next to it")
    return d / CONFIG, weights


def adapter_fingerprint(directory) -> str:
    return fingerprint(list(adapter_files(directory)))


def _read_config(path: Path) -> dict:
    where = f"LoRA adapter {path.parent}: {CONFIG}"
    try:
        c = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlamaExportError(f"{where} is not valid JSON ({e}); save the adapter again") from None
    if not isinstance(c, dict):
        raise LlamaExportError(f"{where} must be a JSON object, got {type(c).__name__}")
    kind = c.get("peft_type")
    if kind != "LORA":
        raise LlamaExportError(f"{where}: peft_type {kind!r} is not supported; only LORA adapters merge into the weights")
    for key, what in UNSUPPORTED.items():
        if c.get(key):
            raise LlamaExportError(f"{where}: {what} is not supported; only plain LoRA (base + scale * B @ A) merges")
    init = c.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise LlamaExportError(
            f"{where}: init_lora_weights {init!r} trains against a base that peft modified (or changes the forward); "
            "save the adapter with save_pretrained(..., path_initial_model_for_weight_conversion=...) so it applies "
            "to the original base")

    def number(name, v, whole):
        if whole:
            whole_number(v, f"{where}: {name}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LlamaExportError(f"{where}: {name} must be a number, got {v!r}")

    number("r", c.get("r"), True)
    number("lora_alpha", c.get("lora_alpha"), False)
    for key, whole in (("rank_pattern", True), ("alpha_pattern", False)):
        pat = c.get(key) or {}
        if not isinstance(pat, dict):
            raise LlamaExportError(f"{where}: {key} must be an object, got {type(pat).__name__}")
        for k, v in pat.items():
            number(f"{key}[{k!r}]", v, whole)
    tm = c.get("target_modules")
    if tm is None:
        c["target_modules"] = PEFT_LLAMA_DEFAULT_TARGETS
    elif not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise LlamaExportError(f"{where}: target_modules must be a list of names or a regular expression, got {tm!r}")
    return c


def _targeted(c: dict, key: str, all_linear: list[str]) -> bool:
    """peft's check_target_module_exists (tuners/tuners_utils.py) for module name `key`."""
    ex = c.get("exclude_modules")
    if ex and (re.fullmatch(ex, key) if isinstance(ex, str) else key in ex or any(key.endswith("." + e) for e in ex)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in c.get("modules_to_save") or []):
        return False  # peft never puts a LoRA on a module it saves whole
    tm = c["target_modules"]
    if isinstance(tm, str) and tm.lower() == "all-linear":  # every linear layer but the output head
        tm = all_linear
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    found = any(key.endswith("." + t) for t in tm)
    layers = c.get("layers_to_transform")
    if found and layers is not None and layers != []:
        pattern = c.get("layers_pattern")
        m = None
        if not pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if m:
                    break
        if m is None:
            return False
        i = int(m["idx"])
        return i == layers if isinstance(layers, int) else i in layers
    return found


def _pattern_value(pattern: dict, module: str, default):
    """peft's get_pattern_key (utils/other.py): the first key matching the module name's tail."""
    for k, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({k})$", module):
            return v
    return default


def _canonical(module: str) -> tuple[str, bool] | None:
    """A module name of the trained model -> (canonical tensor name, rows in HF's rotary order), or None."""
    if _META.fullmatch(module):
        return module + ".weight", False
    hf = module if module.startswith(("model.", "lm_head")) else "model." + module  # LlamaModel has no `model.`
    name = hf_to_canonical(hf + ".weight")
    if name is not None and _META.fullmatch(name.removesuffix(".weight")):
        return name, True
    return None


def _modules(cfg, hf: bool, prefix: str) -> dict[str, str]:
    """The trained model's linear and embedding modules (what LoRA can target) -> canonical names."""
    if hf:
        out = {prefix + "embed_tokens": "tok_embeddings.weight", "lm_head": "output.weight"}
        layer = {f"{prefix}layers.{{i}}.{k}": v for k, v in _HF_LINEAR.items()}
    else:
        out = {"tok_embeddings": "tok_embeddings.weight", "output": "output.weight"}
        layer = {f"layers.{{i}}.{v}": v for v in _HF_LINEAR.values()}
    for i in range(cfg.n_layers):
        out.update({k.format(i=i): f"layers.{i}.{v}.weight" for k, v in layer.items()})
    return out


def _layer(name: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- merging

def apply_lora(ckpt: Checkpoint, adapter_dirs) -> Checkpoint:
    """The checkpoint with each PEFT LoRA adapter in `adapter_dirs` merged into its weights, in order.
    The source records each adapter (path, fingerprint, rank, alpha, modules); a tokenizer in an
    adapter's directory takes the place of the base's."""
    for d in adapter_dirs or []:
        ckpt = _apply_one(ckpt, Path(d).expanduser())
    return ckpt


def _apply_one(ckpt: Checkpoint, d: Path) -> Checkpoint:
    config_file, weights_file = adapter_files(d)
    c = _read_config(config_file)
    where = f"LoRA adapter {d}"
    try:
        t = _Tensors(weights_file)
    except LlamaExportError as e:
        raise LlamaExportError(f"{where}: {e}") from None
    cfg, base = ckpt.config, ckpt.weights
    pairs, whole = _read_keys(t, where)
    canon = _check_targets(c, cfg, pairs, whole, where, weights_file.name)
    new_cfg = _embeddings(t, cfg, base, whole, where)
    deltas = _deltas(t, c, cfg, new_cfg, pairs, canon, where)

    def load(name: str) -> np.ndarray:
        if name in whole:
            key, hf_order, _ = whole[name]
            a = t.get(key)
            if hf_order and name.endswith(("attention.wq.weight", "attention.wk.weight")):
                a = unpermute_hf(a, cfg.n_heads if name.endswith("wq.weight") else cfg.n_kv_heads, cfg.head_dim,
                                 cfg.rope_dim)
        else:
            a = base[name]
        for dl in deltas.get(name, ()):
            A, B = t.get(dl.a), t.get(dl.b)  # A: [r, in], B: [out, r] (embedding: A [r, vocab], B [dim, r])
            if dl.heads:
                B = unpermute_hf(B, dl.heads, cfg.head_dim, cfg.rope_dim)
            delta = B @ A
            a = a + (delta.T if dl.embedding else delta) * np.float32(dl.scale)
        return a

    record = {"path": str(d.resolve()), "fingerprint": fingerprint([config_file, weights_file]),
              "r": c["r"], "alpha": c["lora_alpha"], "use_rslora": bool(c.get("use_rslora")),
              "modules": sorted({m.rsplit(".", 1)[-1] for m in pairs}),
              "replaced": sorted({w[2].rsplit(".", 1)[-1] for w in whole.values()})}
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            record[key] = c[key]
    changes = {k: [getattr(cfg, k), getattr(new_cfg, k)] for k in ("vocab_size", "tie_embeddings")
               if getattr(cfg, k) != getattr(new_cfg, k)}
    if changes:
        record["changes"] = changes
    source = {**ckpt.source, "lora": [*ckpt.source.get("lora", []), record]}
    # a fine-tune that added tokens saves its tokenizer next to the adapter
    tok = str(d) if any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model")) else ckpt.tokenizer_path
    return Checkpoint(new_cfg, Weights(expected_shapes(new_cfg), load, f"{base.origin} + LoRA {d.name}"), source, tok)


def _read_keys(t: _Tensors, where: str) -> tuple[dict[str, dict], dict[str, tuple[str, bool, str]]]:
    """The file's tensors: LoRA pairs by module name ({module: {"lora_A": key, "lora_B": key}}) and whole
    tensors by canonical name ({name: (key, rows in HF's rotary order, module)})."""
    pairs: dict[str, dict] = {}
    whole: dict[str, tuple[str, bool, str]] = {}
    names = set()
    file = t.path.name
    for key in t.keys:
        k = key.removeprefix("base_model.model.")
        m = _LORA.fullmatch(k) or _LORA_EMB.fullmatch(k)
        if m:
            if m.groupdict().get("param") == "bias":
                raise LlamaExportError(f"{where}: {file} holds a bias on lora_B ({key}); "
                                       "LLaMA's layers have no bias to merge it into")
            names.add(m["name"])  # None: saved without the adapter's name, as peft does
            pairs.setdefault(m["module"], {})[m["part"]] = key
            continue
        module, _, param = k.rpartition(".")
        if ".original_module" in module:
            continue  # ModulesToSaveWrapper's untouched copy of the base module: the merged model drops it
        cands = [module.removesuffix(".base_layer")]
        if ".modules_to_save" in module:  # ModulesToSaveWrapper's copy: modules_to_save.<adapter name>.<param>
            cands = [re.sub(r"\.modules_to_save\.[^.]+", "", module, count=1), module.replace(".modules_to_save", "", 1)]
        hit = next((r for r in map(_canonical, cands) if r), None) if param == "weight" else None
        if hit is None:
            what = "a bias, which LLaMA's layers do not have" if param == "bias" else \
                "not a LoRA weight nor a tensor of a LLaMA model"
            raise LlamaExportError(f"{where}: {file} holds {key}, {what}; only plain LoRA adapters "
                                   "(lora_A/lora_B, modules_to_save) merge")
        if hit[0] in whole and ".modules_to_save" not in module:
            continue  # saved twice (peft saves a resized embedding whole besides its modules_to_save copy)
        whole[hit[0]] = (key, hit[1], next(m for m in cands if _canonical(m)))
    if len(names) > 1:
        shown = ", ".join(sorted(n or "(unnamed)" for n in names))
        raise LlamaExportError(f"{where}: {file} holds several adapters ({shown}); "
                               "save each to its own directory and pass --lora for each")
    for module, p in pairs.items():
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        if len(p) != 2 or emb != ("lora_embedding_A" in p and "lora_embedding_B" in p):
            raise LlamaExportError(f"{where}: {file} has {' and '.join(sorted(p))} of {module} but not its "
                                   "pair; the file is incomplete or corrupt, save the adapter again")
    return pairs, whole


def _check_targets(c: dict, cfg, pairs: dict, whole: dict, where: str, file: str) -> dict[str, tuple[str, bool]]:
    """The modules adapter_config.json targets (peft's rules) against the LoRA weights the file holds and
    this base's layers; returns {module: (canonical name, HF rotary order)}."""
    canon = {}
    for module in pairs:
        hit = _canonical(module)
        if hit is None:
            raise LlamaExportError(f"{where}: LoRA weights for {module}, which is not a module of a LLaMA model; "
                                   "the adapter was trained on another architecture")
        canon[module] = hit
    for name in [h[0] for h in canon.values()] + list(whole):
        i = _layer(name)
        if i is not None and i >= cfg.n_layers:
            raise LlamaExportError(f"{where}: has weights for layer {i}, this base has {cfg.n_layers} layers; the adapter "
                                   "was trained on another model")
    # the trained model's module names, in the style the file uses (HF or Meta names, `model.` or not)
    hf = any(h[1] for h in canon.values()) or not canon
    prefix = "" if any(m.startswith(("layers.", "embed_tokens")) for m in canon) else "model."  # LlamaModel: no `model.`
    universe = _modules(cfg, hf, prefix)
    linear = [m for m, n in universe.items() if n.startswith("layers.")]
    targeted = {m for m in universe if _targeted(c, m, linear)}
    shown = c["target_modules"] if isinstance(c["target_modules"], str) else ", ".join(c["target_modules"])
    if not targeted:
        kinds = ", ".join(dict.fromkeys(m.rsplit(".", 1)[-1] for m in universe))
        raise LlamaExportError(f"{where}: target_modules ({shown}) match no module of this model (its modules: {kinds}); "
                               "the adapter was trained on another architecture")
    if set(pairs) - targeted:
        extra = sorted(set(pairs) - targeted)
        raise LlamaExportError(f"{where}: {file} has LoRA weights for {extra[0]}, which target_modules "
                               f"({shown}) does not select; {CONFIG} does not belong to these weights")
    if targeted - set(pairs):
        missing = sorted(targeted - set(pairs), key=lambda m: (_layer(universe[m]) or 0, m))
        have = {_layer(h[0]) for h in canon.values()} - {None}
        hint = (f"the adapter covers layers up to {max(have)}, this base has {cfg.n_layers}; it was trained on another "
                "model" if have and max(have) < cfg.n_layers - 1 else "the file is incomplete, save the adapter again")
        raise LlamaExportError(f"{where}: {CONFIG} targets {missing[0]}, but {file} has no LoRA weights "
                               f"for it; {hint}")
    return canon


def _embeddings(t: _Tensors, cfg, base, whole: dict, where: str):
    """Check the whole tensors' shapes; returns the config with a resized vocabulary and the tie of the
    embeddings the adapter gives (`whole` is updated to match a tie that stays)."""
    shapes = expected_shapes(cfg)
    for name, (key, _, module) in whole.items():
        got, want = t.shape(key), shapes.get(name, shapes["tok_embeddings.weight"])
        vocab_row = name in ("tok_embeddings.weight", "output.weight")
        if got != want and not (vocab_row and len(got) == 2 and got[1] == cfg.dim):
            raise LlamaExportError(f"{where}: {module} is {list(got)}, this base's is {list(want)}; the adapter was "
                                   "trained on a model of another shape")
    vocab, tied = cfg.vocab_size, cfg.tie_embeddings
    emb, out = whole.get("tok_embeddings.weight"), whole.get("output.weight")
    rows = {n: t.shape(w[0])[0] for n, w in (("embed_tokens", emb), ("lm_head", out)) if w}
    if len(set(rows.values())) > 1 or (not tied and len(rows) == 1 and vocab not in rows.values()):
        sizes = {**{"embed_tokens": vocab, "lm_head": vocab}, **rows}
        raise LlamaExportError(f"{where}: embed_tokens has {sizes['embed_tokens']} rows but lm_head "
                               f"{sizes['lm_head']}; a resized vocabulary needs both in modules_to_save")
    if rows:
        vocab = next(iter(rows.values()))
    if tied and rows:
        # one shared matrix: stays shared where the adapter's copies are equal (what a LoRA on the embedding
        # saves as base_layer), else the adapter unties it (both copies saved, each its own)
        a = t.get(emb[0]) if emb else None
        b = t.get(out[0]) if out else None
        if a is None or b is None:
            same = vocab == cfg.vocab_size and np.array_equal(a if a is not None else b, base["tok_embeddings.weight"])
            if not same:
                raise LlamaExportError(f"{where}: the base ties its input and output embeddings and the adapter replaces "
                                       f"only {'embed_tokens' if emb else 'lm_head'}; save both in modules_to_save")
        elif not np.array_equal(a, b):
            tied = False
        if tied and out:
            whole.pop("output.weight")
            if not emb:
                whole["tok_embeddings.weight"] = out
    return dataclasses.replace(cfg, vocab_size=vocab, tie_embeddings=tied)


def _deltas(t: _Tensors, c: dict, cfg, new_cfg, pairs: dict, canon: dict, where: str) -> dict[str, list[_Delta]]:
    """{canonical name: its LoRA deltas}, shapes checked against the (possibly resized) model."""
    shapes = expected_shapes(new_cfg)
    deltas: dict[str, list[_Delta]] = {}
    for module, p in sorted(pairs.items()):
        name, hf_order = canon[module]
        if new_cfg.tie_embeddings and name == "output.weight":
            name = "tok_embeddings.weight"  # peft merges into the one shared matrix
        embedding = "lora_embedding_A" in p
        ka, kb = (p["lora_embedding_A"], p["lora_embedding_B"]) if embedding else (p["lora_A"], p["lora_B"])
        r = _pattern_value(c.get("rank_pattern"), module, c["r"])
        alpha = _pattern_value(c.get("alpha_pattern"), module, c["lora_alpha"])
        out_dim, in_dim = shapes[name][::-1] if embedding else shapes[name]
        sa, sb = t.shape(ka), t.shape(kb)
        if sa != (r, in_dim) or sb != (out_dim, r):
            if len(sa) == 2 and len(sb) == 2 and sa[1] == in_dim and sb[0] == out_dim and sa[0] == sb[1]:
                raise LlamaExportError(f"{where}: the LoRA of {module} has rank {sa[0]}, {CONFIG} gives r={r} for it; "
                                       "the config does not belong to these weights")
            raise LlamaExportError(f"{where}: the LoRA of {module} is A {list(sa)} @ B {list(sb)}, this base needs "
                                   f"A [r, {in_dim}] and B [{out_dim}, r]; the adapter was trained on a model of another shape")
        heads = None
        if hf_order and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = cfg.n_heads if name.endswith("wq.weight") else cfg.n_kv_heads
        scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
        deltas.setdefault(name, []).append(_Delta(ka, kb, scale, embedding, heads))
    return deltas


def base_config(cfg, lora_records: list[dict]):
    """The base model's config, from a merged build's config and the changes its adapters recorded."""
    for rec in reversed(lora_records):
        for k, (before, _) in (rec.get("changes") or {}).items():
            cfg = dataclasses.replace(cfg, **{k: before})
    return cfg
