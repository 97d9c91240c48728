"""`build --lora`: PEFT LoRA adapters merged into the weights, against peft's own merge_and_unload().

Every adapter here is made by real peft (init_lora_weights=False, so B is not zero) on a tiny seeded
HF model; the reference is PeftModel.from_pretrained(base, adapter).merge_and_unload() run by
transformers. The merge arithmetic is checked where it happens: the weights `build` exports
(lora.apply_lora over the loader's streaming checkpoint, as build.pipeline calls it) against peft's
merged state dict, tensor by tensor, its q/k rows put in Meta's order by this file's own permutation
(test_checkpoint.hf_to_meta_qk, not the loader's). A few builds carry it end to end: our artifact
(fp32, CPU) must give the same logits as the peft-merged model (max |diff| <= 1e-3) and the same
greedy tokens."""

import json
import shutil
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, make_hf_model, run_cli, train_tiny_spm
from test_checkpoint import _write_gguf, hf_to_meta_qk

pytest.importorskip("peft", reason="the LoRA tests compare with peft: pip install 'llamaexport[test]'")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from llamaexport.build.pipeline import build  # noqa: E402
from llamaexport.model.checkpoint import load_checkpoint  # noqa: E402
from llamaexport.model.lora import apply_lora  # noqa: E402
from llamaexport.runtime.llama_model import LlamaModel  # noqa: E402

VOCAB = 400  # train_tiny_spm's vocabulary, so HF and Meta bases find a tokenizer next to them
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = (np.arange(3, 43) * 7 % VOCAB).tolist()
N_NEW = 12
HEADS, KV_HEADS = 4, 2  # make_hf_model's

# HF LlamaForCausalLM parameter names -> Meta's (written here, not taken from the loader)
HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
          "lm_head.weight": "output.weight"}
HF_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm"}
SHORT = {k.rsplit(".", 1)[-1]: v for k, v in HF_LAYER.items()}  # q_proj -> attention.wq


def meta_name(key: str) -> str:
    if key in HF_TOP:
        return HF_TOP[key]
    i, rest = key[len("model.layers."):].split(".", 1)
    return f"layers.{i}.{HF_LAYER[rest.rsplit('.', 1)[0]]}.weight"


def meta_state(model) -> dict[str, np.ndarray]:
    """An HF model's state dict in Meta's names and q/k row order (float32 numpy)."""
    out = {}
    for k, v in model.state_dict().items():
        name, w = meta_name(k), v.float().numpy()
        if name.endswith(("wq.weight", "wk.weight")):
            w = hf_to_meta_qk(w, HEADS if "wq" in name else KV_HEADS)
        out[name] = np.ascontiguousarray(w)
    return out


def names(*modules, layers=(0, 1)) -> set[str]:
    """Meta names of HF module short names (q_proj, ..., embed_tokens, lm_head) in these layers."""
    out = set()
    for m in modules:
        if m in ("embed_tokens", "lm_head"):
            out.add({"embed_tokens": "tok_embeddings.weight", "lm_head": "output.weight"}[m])
        else:
            out |= {f"layers.{i}.{SHORT[m]}.weight" for i in layers}
    return out


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():  # peft warns about fan_in_fan_out, tied weights, missing base names
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One tiny HF model saved as HF safetensors (untied and tied), as a Meta fp32 consolidated.00.pth and as
    an F32 GGUF, with a sentencepiece tokenizer in their parent directory."""
    import gguf

    root = tmp_path_factory.mktemp("lora-bases")
    train_tiny_spm(root)
    hf = make_hf_model(root / "hf", vocab_size=VOCAB)
    make_hf_model(root / "tied", vocab_size=VOCAB, tie_word_embeddings=True, seed=3)
    (root / "meta").mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in meta_state(hf).items()}, root / "meta" / "consolidated.00.pth")
    (root / "meta" / "params.json").write_text(json.dumps({
        "dim": 64, "n_layers": 2, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "vocab_size": -1, "multiple_of": 32,
        "norm_eps": 1e-6, "ffn_dim_multiplier": 0.565, "max_seq_len": 256}))
    _write_gguf(root / "m.gguf", hf, gguf.GGMLQuantizationType.F32)
    return root


def make_adapter(base_dir, out, *, seed=1, safe=True, resize=None, **lora):
    """Train nothing: a peft LoRA with random A and B (init_lora_weights=False), saved to `out`."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    if resize:
        model.resize_token_embeddings(resize)
    torch.manual_seed(seed)
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out, safe_serialization=safe)
    return out


def peft_merged(base_dir, adapters, resize=None):
    model = LlamaForCausalLM.from_pretrained(base_dir)
    if resize:
        model.resize_token_embeddings(resize)
    for a in adapters:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return model.eval()


# ----------------------------------------------------------------------------- the merged weights

def our_merge(checkpoint, adapters):
    """What `build --lora` exports: the loader's checkpoint with the adapters applied (build.pipeline)."""
    return apply_lora(load_checkpoint(checkpoint), adapters)


def assert_merge_matches_peft(ckpt, reference, base_dir) -> set[str]:
    """Every tensor of our merged checkpoint against peft's merged state dict (in Meta's names and q/k
    order), to float32 rounding. Returns the tensors the adapter changed (by more than 1e-3 somewhere,
    with the tolerance 1e-6: the comparison could fail), which each test states."""
    want = meta_state(reference)
    if ckpt.config.tie_embeddings:  # one shared matrix: peft's state dict lists it twice
        assert np.array_equal(want.pop("output.weight"), want["tok_embeddings.weight"])
    assert set(ckpt.weights) == set(want)
    for name, w in want.items():
        np.testing.assert_allclose(ckpt.weights[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
    base = meta_state(LlamaForCausalLM.from_pretrained(base_dir))
    return {n for n, w in want.items() if n not in base or w.shape != base[n].shape or np.abs(w - base[n]).max() > 1e-3}


@pytest.mark.parametrize("base", ["hf", "meta", "m.gguf"])
def test_every_target_module_merges_like_peft(bases, tmp_path, base):
    """q/k/v/o/gate/up/down on an HF base and on the same weights as a Meta checkpoint and a GGUF: q and k
    deltas come in HF's rotary order and must be permuted back whatever the base's format."""
    ad = make_adapter(bases / "hf", tmp_path / "ad", r=4, lora_alpha=8, target_modules=ALL)
    ckpt = our_merge(bases / base, [ad])
    assert assert_merge_matches_peft(ckpt, peft_merged(bases / "hf", [ad]), bases / "hf") == names(*ALL)


VARIANTS = {  # LoraConfig, the tensors it changes
    "rslora": (dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
               names("q_proj", "k_proj", "down_proj")),
    "rank-alpha-patterns": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
                                 rank_pattern={"k_proj": 2, "model.layers.1.mlp.up_proj": 6},
                                 alpha_pattern={"q_proj": 32}),
                            names("q_proj", "k_proj", "up_proj")),
    "regex-targets": (dict(r=4, lora_alpha=8, target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"),
                      names("q_proj", "v_proj", layers=[1])),
    "all-linear": (dict(r=2, lora_alpha=4, target_modules="all-linear"), names(*ALL)),
    "layers-to-transform": (dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], layers_to_transform=[1]),
                            names("k_proj", "o_proj", layers=[1])),
    "exclude-modules": (dict(r=4, lora_alpha=8, target_modules=ALL, exclude_modules=["gate_proj", "up_proj"]),
                        names("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")),
    "embeddings": (dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
                   names("embed_tokens", "lm_head", "q_proj")),
    "adapter_model.bin": (dict(r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj"], safe=False),
                          names("k_proj", "gate_proj")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_options_merge_like_peft(bases, tmp_path, variant):
    kw, changed = VARIANTS[variant]
    ad = make_adapter(bases / "hf", tmp_path / "ad", **kw)
    assert (ad / "adapter_model.bin").is_file() == (not kw.get("safe", True))
    assert assert_merge_matches_peft(our_merge(bases / "hf", [ad]), peft_merged(bases / "hf", [ad]),
                                     bases / "hf") == changed


def test_tied_embeddings_stay_tied_under_an_embedding_lora(bases, tmp_path):
    """A LoRA on embed_tokens of a tied model: peft merges it into the one shared matrix, so the output
    layer changes too (peft saves the embedding's base_layer, which equals the base's)."""
    ad = make_adapter(bases / "tied", tmp_path / "ad", r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"])
    ckpt = our_merge(bases / "tied", [ad])
    assert ckpt.config.tie_embeddings is True and "output.weight" not in ckpt.weights
    assert assert_merge_matches_peft(ckpt, peft_merged(bases / "tied", [ad]), bases / "tied") == \
        names("embed_tokens", "v_proj")


def test_fan_in_fan_out_is_ignored_on_linear_layers_as_peft_does(bases, tmp_path):
    """peft resets fan_in_fan_out to False for torch.nn.Linear (lora/layer.py), so a config saying true
    merges exactly like one saying false; transposing would be wrong (and fit only square layers)."""
    ad = make_adapter(bases / "hf", tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    c = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**c, "fan_in_fan_out": True}))
    assert assert_merge_matches_peft(our_merge(bases / "hf", [ad]), peft_merged(bases / "hf", [ad]),
                                     bases / "hf") == names("q_proj", "o_proj")


def test_meta_named_adapter_is_in_meta_order(bases, tmp_path):
    """The same adapter with Meta's module names (layers.0.attention.wq) and its q/k rows already in
    Meta's interleaved order merges to the same model: the permutation follows the names."""
    from safetensors.torch import load_file, save_file

    ad = make_adapter(bases / "hf", tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"])
    meta = tmp_path / "meta-ad"
    meta.mkdir()
    rename = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "mlp.up_proj": "feed_forward.w3"}
    state = {}
    for k, v in load_file(ad / "adapter_model.safetensors").items():
        k = k.replace("base_model.model.model.", "base_model.model.")
        for a, b in rename.items():
            k = k.replace(a, b)
        if "lora_B" in k and ("wq" in k or "wk" in k):
            v = torch.from_numpy(np.ascontiguousarray(hf_to_meta_qk(v.numpy(), HEADS if "wq" in k else KV_HEADS)))
        state[k] = v
    save_file(state, meta / "adapter_model.safetensors")
    c = json.loads((ad / "adapter_config.json").read_text())
    (meta / "adapter_config.json").write_text(json.dumps({**c, "target_modules": ["wq", "wk", "w3"]}))
    assert assert_merge_matches_peft(our_merge(bases / "meta", [meta]), peft_merged(bases / "hf", [ad]),
                                     bases / "hf") == names("q_proj", "k_proj", "up_proj")


def test_two_adapters_apply_in_order(bases, tmp_path):
    """Both merged, in the order given, and recorded in that order in the source (the manifest's
    source.lora: build writes the checkpoint's source as is)."""
    a1 = make_adapter(bases / "hf", tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
    a2 = make_adapter(bases / "hf", tmp_path / "a2", seed=2, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "gate_proj"])
    ckpt = our_merge(bases / "hf", [a1, a2])
    assert assert_merge_matches_peft(ckpt, peft_merged(bases / "hf", [a1, a2]), bases / "hf") == \
        names("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")
    lora = ckpt.source["lora"]
    assert [a["path"] for a in lora] == [str(a1.resolve()), str(a2.resolve())]
    assert [a["modules"] for a in lora] == [["k_proj", "q_proj", "v_proj"], ["gate_proj", "o_proj", "q_proj"]]
    assert [(a["r"], a["alpha"]) for a in lora] == [(4, 8), (2, 4)]


def resized_adapter(bases, out):
    """Added tokens: embed_tokens and lm_head resized to 410 rows and saved whole, with the adapter's
    tokenizer (410 pieces) next to it."""
    ad = make_adapter(bases / "hf", out, resize=VOCAB + 10, r=4, lora_alpha=8,
                      target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    train_tiny_spm(ad, VOCAB + 10)
    return ad


@pytest.mark.parametrize("base", ["hf", "meta"])
def test_modules_to_save_with_a_resized_vocabulary(bases, tmp_path, base):
    ad = resized_adapter(bases, tmp_path / "ad")
    ckpt = our_merge(bases / base, [ad])
    assert ckpt.config.vocab_size == VOCAB + 10 and ckpt.config.tie_embeddings is False
    assert ckpt.source["lora"][0]["replaced"] == ["embed_tokens", "lm_head"]
    assert ckpt.source["lora"][0]["changes"] == {"vocab_size": [VOCAB, VOCAB + 10]}
    assert ckpt.tokenizer_path == str(ad)  # the adapter's tokenizer, not the base's
    assert assert_merge_matches_peft(ckpt, peft_merged(bases / "hf", [ad], resize=VOCAB + 10), bases / "hf") == \
        names("embed_tokens", "lm_head", "q_proj", "v_proj")


def test_old_style_modules_to_save_keys(bases, tmp_path):
    """`<module>.modules_to_save.<adapter>.weight` and `lora_A.<adapter>.weight` (the adapter's name
    left in) read like peft's current `<module>.weight` and `lora_A.weight`."""
    from safetensors.torch import load_file, save_file

    ad = make_adapter(bases / "hf", tmp_path / "ad", r=4, lora_alpha=8, target_modules=["v_proj"],
                      modules_to_save=["lm_head", "input_layernorm"])
    # the whole tensors differ from the base's (as after training), so it shows where they were read from
    state = {k: v if "lora_" in k else v * 1.5 for k, v in load_file(ad / "adapter_model.safetensors").items()}
    save_file(state, ad / "adapter_model.safetensors")
    old = {}
    for k, v in state.items():
        if "lora_" in k:
            k = k.replace(".weight", ".default.weight")
        else:
            module, _, p = k.rpartition(".")
            k = f"{module}.modules_to_save.default.{p}"
        old[k] = v
    assert "base_model.model.lm_head.modules_to_save.default.weight" in old
    (tmp_path / "old").mkdir()  # peft itself reads only its current form: the reference comes from `ad`
    save_file(old, tmp_path / "old" / "adapter_model.safetensors")
    shutil.copy(ad / "adapter_config.json", tmp_path / "old")
    assert assert_merge_matches_peft(our_merge(bases / "hf", [tmp_path / "old"]), peft_merged(bases / "hf", [ad]),
                                     bases / "hf") == names("v_proj") | {"output.weight", "layers.0.attention_norm.weight",
                                                                         "layers.1.attention_norm.weight"}


# ----------------------------------------------------------------------------- end to end: artifacts

def hf_logits_and_greedy(model):
    ids = torch.tensor([IDS])
    with torch.no_grad():
        logits = model(ids).logits[0].numpy()
        out = []
        for _ in range(N_NEW):
            out.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
    return logits, out


def assert_matches_peft(art, reference, *, base_dir=None):
    """Our artifact's logits and greedy tokens against the peft-merged model's (and, given the base, that
    the adapter changes the logits: the comparison could fail)."""
    want, want_tokens = hf_logits_and_greedy(reference)
    with LlamaModel.load(art, threads=1) as m:
        ids = np.array([IDS])
        got, _ = m.backend.forward(ids, np.ones_like(ids), np.arange(len(IDS))[None], m.backend.empty_cache(1))
        tokens = m.generate_ids([IDS], max_new_tokens=N_NEW, eos_ids=[])[0]
    assert np.abs(got[0] - want).max() <= 1e-3
    assert tokens == want_tokens
    if base_dir is not None:
        plain, _ = hf_logits_and_greedy(LlamaForCausalLM.from_pretrained(base_dir).eval())
        assert np.abs(plain - want).max() > 0.05  # the adapter matters at this scale


def our_build(tmp_path, checkpoint, adapters, **kw):
    return build(out=tmp_path / "art", checkpoint=checkpoint, lora=adapters, precision="fp32", profile="cpu",
                 progress=False, **kw)


@pytest.fixture(scope="module")
def hf_all(bases, tmp_path_factory):
    """`llamaexport build --lora` (the command) of the HF base with a LoRA on every linear module:
    .art, .adapter. Tests that change either work on copies or put it back."""
    d = tmp_path_factory.mktemp("lora-hf-all")
    ad = make_adapter(bases / "hf", d / "ad", r=4, lora_alpha=8, target_modules=ALL)
    r = run_cli("build", "--checkpoint", bases / "hf", "--lora", ad, "--precision", "fp32", "--out", d / "art")
    assert r.returncode == 0, r.stderr
    return types.SimpleNamespace(art=d / "art", adapter=ad)


def test_every_target_module_end_to_end_hf(bases, hf_all):
    assert_matches_peft(hf_all.art, peft_merged(bases / "hf", [hf_all.adapter]), base_dir=bases / "hf")


def test_every_target_module_end_to_end_meta(bases, hf_all, tmp_path):
    art = our_build(tmp_path, bases / "meta", [hf_all.adapter], tokenizer=bases / "tokenizer.model")
    assert_matches_peft(art, peft_merged(bases / "hf", [hf_all.adapter]), base_dir=bases / "hf")


def test_resized_vocabulary_end_to_end(bases, tmp_path):
    """The artifact of a base whose adapter added tokens: 410 rows, the adapter's 410-piece tokenizer,
    the manifest saying so, and peft's logits."""
    ad = resized_adapter(bases, tmp_path / "ad")
    art = our_build(tmp_path, bases / "meta", [ad])
    m = json.loads((art / "manifest.json").read_text())
    assert m["model"]["vocab_size"] == VOCAB + 10 and m["model"]["tie_embeddings"] is False
    assert m["source"]["lora"][0]["replaced"] == ["embed_tokens", "lm_head"]
    assert m["source"]["lora"][0]["changes"] == {"vocab_size": [VOCAB, VOCAB + 10]}
    with LlamaModel.load(art) as lm:
        assert lm.tokenizer.vocab_size == VOCAB + 10
    assert_matches_peft(art, peft_merged(bases / "hf", [ad], resize=VOCAB + 10))


# ----------------------------------------------------------------------------- manifest, inspect, check

def test_check_uses_the_merged_reference_and_refuses_a_changed_adapter(hf_all):
    """`check` of a `build --lora` artifact passes the fp32 budget (max |dlogit| <= 1e-3), which it could not
    if the reference lacked the adapter (it moves the logits by more than 0.05); a changed adapter is refused."""
    from llamaexport.verify.parity import check

    art, ad = hf_all.art, hf_all.adapter
    report = check(art, n_tokens=8, progress=False, write=False)
    assert report["passed"], report["failures"]
    assert report["reference"].endswith("+ 1 LoRA adapter") and report["max_abs_logit"] < 1e-4
    m = json.loads((art / "manifest.json").read_text())
    rec = m["source"]["lora"][0]
    assert m["source"]["kind"] == "hf" and rec["path"] == str(ad.resolve())
    assert rec["fingerprint"].startswith("sha256-head-tail:")
    assert (rec["r"], rec["alpha"], rec["use_rslora"]) == (4, 8, False)
    assert rec["modules"] == sorted(ALL) and rec["replaced"] == []
    rows = [r for r in run_cli("inspect", art).stdout.splitlines() if r.startswith("lora ")]
    assert len(rows) == 1 and f" {ad.resolve()} (r 4, alpha 8: down_proj, gate_proj, k_proj" in rows[0]

    config = ad / "adapter_config.json"
    saved = config.read_text()
    try:
        config.write_text(json.dumps({**json.loads(saved), "lora_alpha": 16}))
        assert_clean_error(run_cli("check", art), f"the LoRA adapter at {ad.resolve()} changed since the build")
    finally:
        config.write_text(saved)


def test_manifest_lora_entries_are_validated(hf_all, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(hf_all.art, art)
    m = json.loads((art / "manifest.json").read_text())
    m["source"]["lora"] = [{"path": str(hf_all.adapter)}]
    (art / "manifest.json").write_text(json.dumps(m))
    assert_clean_error(run_cli("inspect", art), "source.lora must be a list of objects with path and fingerprint")


def test_lora_on_random_weights_checks(tmp_path):
    """--size with --lora: check rebuilds the random base (its original vocabulary) and re-applies the adapter."""
    from llamaexport.model.config import config_for_size
    from llamaexport.verify.parity import check

    cfg = config_for_size("tiny")
    hf = tmp_path / "hf"  # an HF model of the tiny shape, only to make the adapter with peft
    make_hf_model(hf, vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads)
    ad = make_adapter(hf, tmp_path / "ad", resize=cfg.vocab_size + 8, r=4, lora_alpha=8, target_modules=["q_proj"],
                      modules_to_save=["embed_tokens", "lm_head"])
    art = build(out=tmp_path / "art", size="tiny", seed=5, lora=[ad], progress=False)
    assert json.loads((art / "manifest.json").read_text())["model"]["vocab_size"] == cfg.vocab_size + 8
    report = check(art, n_tokens=4, progress=False)
    assert report["passed"] and report["max_abs_logit"] < 1e-4


# ----------------------------------------------------------------------------- refusals

def _set(key, value):
    def edit(ad, tmp_path):
        c = json.loads((ad / "adapter_config.json").read_text())
        (ad / "adapter_config.json").write_text(json.dumps({**c, key: value}))
    return edit


def _other_model(**shape):
    def edit(ad, tmp_path):
        make_hf_model(tmp_path / "other", vocab_size=VOCAB, **shape)
        shutil.rmtree(ad)
        make_adapter(tmp_path / "other", ad, r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    return edit


def _add_tensor(key, shape):
    def edit(ad, tmp_path):
        from safetensors.torch import load_file, save_file
        state = load_file(ad / "adapter_model.safetensors")
        save_file({**state, key: torch.ones(shape)}, ad / "adapter_model.safetensors")
    return edit


def _truncate(ad, tmp_path):
    f = ad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:300])


def _pickled_code(ad, tmp_path):
    import fractions

    (ad / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": fractions.Fraction(1, 3)},
               ad / "adapter_model.bin")


REFUSALS = {
    "missing directory": (lambda ad, tmp: shutil.rmtree(ad), ["does not exist"]),
    "no adapter_config.json": (lambda ad, tmp: (ad / "adapter_config.json").unlink(), ["has no adapter_config.json"]),
    "no weights file": (lambda ad, tmp: (ad / "adapter_model.safetensors").unlink(),
                        ["neither adapter_model.safetensors nor adapter_model.bin"]),
    "invalid json": (lambda ad, tmp: (ad / "adapter_config.json").write_text("{"), ["adapter_config.json is not valid JSON"]),
    "corrupt weights": (_truncate, ["adapter_model.safetensors", "corrupt or truncated"]),
    "code in a .bin": (_pickled_code, ["adapter_model.bin holds Python objects or code besides tensors"]),
    "IA3": (_set("peft_type", "IA3"), ["peft_type 'IA3' is not supported", "only LORA"]),
    "DoRA": (_set("use_dora", True), ["DoRA (use_dora) is not supported"]),
    "PiSSA": (_set("init_lora_weights", "pissa"), ["init_lora_weights 'pissa'", "path_initial_model_for_weight_conversion"]),
    "lora_bias": (_set("lora_bias", True), ["a bias on lora_B (lora_bias) is not supported"]),
    "targets nothing": (_set("target_modules", ["qkv_proj"]), ["target_modules (qkv_proj) match no module of this model"]),
    "targets fewer than the file": (_set("target_modules", ["q_proj"]),
                                    ["has LoRA weights for model.layers.0.mlp.gate_proj, which target_modules (q_proj)"]),
    "rank differs from r": (_set("r", 8), ["the LoRA of model.layers.0.mlp.gate_proj has rank 4", "gives r=8"]),
    "bad r": (_set("r", 0), ["r must be a whole number >= 1, got 0"]),
    "another shape": (_other_model(intermediate_size=128),
                      ["the LoRA of model.layers.0.mlp.gate_proj is A [4, 64] @ B [128, 4]", "B [96, r]", "another shape"]),
    "more layers": (_other_model(num_hidden_layers=3), ["has weights for layer 2, this base has 2 layers"]),
    "fewer layers": (_other_model(num_hidden_layers=1),
                     ["targets model.layers.1.", "covers layers up to 0, this base has 2"]),
    "a bias": (_add_tensor("base_model.model.model.layers.0.self_attn.q_proj.bias", (64,)),
               ["holds base_model.model.model.layers.0.self_attn.q_proj.bias, a bias"]),
    "a foreign tensor": (_add_tensor("base_model.model.model.layers.0.mlp.experts.weight", (4, 4)),
                         ["holds base_model.model.model.layers.0.mlp.experts.weight, not a LoRA weight"]),
    "two adapter names": (_add_tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_A.other.weight", (4, 64)),
                          ["holds several adapters"]),
}


@pytest.fixture(scope="module")
def plain_adapter(bases, tmp_path_factory):
    return make_adapter(bases / "hf", tmp_path_factory.mktemp("plain") / "ad", r=4, lora_alpha=8,
                        target_modules=["q_proj", "gate_proj"])


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_adapters_are_one_line(bases, plain_adapter, tmp_path, case):
    edit, fragments = REFUSALS[case]
    ad = shutil.copytree(plain_adapter, tmp_path / "ad")
    edit(ad, tmp_path)
    r = run_cli("build", "--checkpoint", bases / "hf", "--lora", ad, "--out", tmp_path / "o")
    line = assert_clean_error(r, *fragments)
    assert str(ad) in line  # the adapter is named
    assert not (tmp_path / "o").exists()


def test_tied_base_with_one_embedding_replaced_is_refused(bases, tmp_path):
    ad = make_adapter(bases / "tied", tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"],
                      modules_to_save=["lm_head"])
    from safetensors.torch import load_file, save_file
    state = load_file(ad / "adapter_model.safetensors")
    state["base_model.model.lm_head.weight"] = state["base_model.model.lm_head.weight"] * 2
    save_file(state, ad / "adapter_model.safetensors")
    assert_clean_error(run_cli("build", "--checkpoint", bases / "tied", "--lora", ad, "--out", tmp_path / "o"),
                       "ties its input and output embeddings and the adapter replaces only lm_head")
