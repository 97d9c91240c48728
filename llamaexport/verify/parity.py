"""`llamaexport check`: compare an artifact with the eager float32 PyTorch reference.

For each prompt the artifact generates a greedy continuation through the runtime's decode loop
(LlamaModel.steps: what `run` and the API use, last-position logits and cache reuse included);
the reference (a) generates its own greedy continuation through the same loop and (b) scores
prompt + the artifact's continuation in one teacher-forced forward, so every artifact logit
(prefill and each decode step) is compared with the reference logit at the same position. Metrics: max and
mean |logit difference|, KL(reference || artifact) of next-token distributions, top-1
agreement, greedy agreement (the matching prefix of the two continuations), and perplexity on
a held-out text. Thresholds are data (data/parity_thresholds.json) per precision; a miss fails.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError, log
from llamaexport.artifact.manifest import read_manifest, require_intact, write_atomically, write_manifest

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "Explain in one paragraph why the sky is blue.",
]


def thresholds(precision: str) -> dict:
    data = json.loads(resources.files("llamaexport").joinpath("data/parity_thresholds.json").read_text())
    if precision not in data:
        raise LlamaExportError(f"no parity thresholds for precision {precision!r}")
    return data[precision]


def heldout_text() -> str:
    return resources.files("llamaexport").joinpath("data/heldout.txt").read_text()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, art: np.ndarray) -> dict:
    """ref, art: [N, V] logits at the same N positions."""
    diff = np.abs(ref.astype(np.float64) - art.astype(np.float64))
    lr, la = _log_softmax(ref), _log_softmax(art)
    kl = (np.exp(lr) * (lr - la)).sum(-1)
    return {"max_abs": float(diff.max()), "sum_abs": float(diff.sum()), "n_abs": diff.size,
            "kl": kl, "top1": ref.argmax(-1) == art.argmax(-1)}


def _available_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def require_reference_memory(cfg):
    """Refuse before loading when the float32 reference would not fit in the free RAM."""
    need = cfg.n_params() * 4
    if need > 0.8 * _available_bytes():
        raise LlamaExportError(f"the float32 reference needs {need / 2**30:.1f} GiB of RAM, more than this machine "
                               "has free; check a smaller model, or on a machine with more memory")


def reference_checkpoint(manifest: dict, reference):
    """The checkpoint the artifact was built from (or `reference`), with the LoRA adapters its build
    merged applied again, and a description of it."""
    from llamaexport.model.checkpoint import load_checkpoint, random_checkpoint
    from llamaexport.model.config import LlamaConfig
    from llamaexport.model.lora import adapter_fingerprint, apply_lora, base_config

    cfg = LlamaConfig.from_dict(manifest["model"])
    src = manifest["source"]
    adapters = src.get("lora") or []
    for a in adapters:  # before loading them: an adapter that changed would merge into another model
        if adapter_fingerprint(a["path"]) != a["fingerprint"]:
            raise LlamaExportError(f"the LoRA adapter at {a['path']} changed since the build (fingerprint differs); "
                                   "rebuild with it, or restore the adapter the build used")
    lora_desc = f" + {len(adapters)} LoRA adapter{'s' if len(adapters) > 1 else ''}" if adapters else ""
    if reference is None and src["kind"] == "random":
        ckpt = apply_lora(random_checkpoint(base_config(cfg, adapters), src["seed"]), [a["path"] for a in adapters])
        ckpt.config = cfg
        return ckpt, f"random weights, seed {src['seed']}{lora_desc}"
    path = reference or src.get("path")
    ckpt = load_checkpoint(path)
    if reference is None and ckpt.source.get("fingerprint") != src.get("fingerprint"):
        raise LlamaExportError(f"the checkpoint at {path} changed since the build (fingerprint differs); "
                               "rebuild, or pass --reference to compare against it anyway")
    ckpt = apply_lora(ckpt, [a["path"] for a in adapters])  # a --reference is a base too: the build's adapters apply
    mine = {k: v for k, v in ckpt.config.to_dict().items() if k != "max_seq_len"}
    theirs = {k: v for k, v in cfg.to_dict().items() if k != "max_seq_len"}
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise LlamaExportError(f"reference {path} is a different model (differs in {', '.join(diff)})")
    ckpt.config = cfg
    return ckpt, f"{ckpt.source['kind']} {Path(path).resolve()}{lora_desc}"


def check(artifact, *, reference=None, prompts=None, n_tokens: int = 64, progress: bool = True,
          write: bool = True, backend: str | None = None) -> dict:
    """Run the parity check; writes DIR/parity.json and the manifest's parity summary."""
    from llamaexport.model.reference import ReferenceBackend, build_reference
    from llamaexport.runtime.llama_model import LlamaModel

    d = Path(artifact)
    manifest = read_manifest(d)
    require_intact(d, manifest)  # a flipped byte in the weights is named here, not found through the numbers
    model = LlamaModel.load(d, backend=backend)
    cfg = model.config
    require_reference_memory(cfg)
    ckpt, ref_desc = reference_checkpoint(manifest, reference)
    ref = LlamaModel(d, manifest, ReferenceBackend(build_reference(cfg, ckpt.weights)), model.tokenizer)
    prompt_ids = _prompt_ids(model, prompts or DEFAULT_PROMPTS)
    n_tokens = max(1, min(n_tokens, cfg.max_seq_len - max(len(p) for p in prompt_ids) - 1))
    say = log if progress else (lambda s: None)

    per_prompt, kls, top1s, abs_maxes, abs_sum, abs_n = [], [], [], [], 0.0, 0
    for i, ids in enumerate(prompt_ids):
        say(f"check: prompt {i + 1}/{len(prompt_ids)} ({len(ids)} tokens, {n_tokens} greedy tokens)")
        c, row = _compare_prompt(model, ref, ids, n_tokens)
        abs_maxes.append(c["max_abs"])  # np.max keeps a NaN (Python's max would drop it)
        abs_sum, abs_n = abs_sum + c["sum_abs"], abs_n + c["n_abs"]
        kls.append(c["kl"])
        top1s.append(c["top1"])
        per_prompt.append(row)

    say("check: perplexity on the held-out text")
    ppl_ref, ppl_art = _perplexities(model, ref, cfg)
    kl = np.concatenate(kls)
    report = {
        "artifact": str(d), "precision": manifest["precision"], "reference": ref_desc,
        "backend": backend or manifest.get("backend"),
        "prompts": len(prompt_ids), "greedy_tokens": n_tokens,
        "max_abs_logit": float(np.max(abs_maxes)), "mean_abs_logit": abs_sum / abs_n,
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "top1_agreement": float(np.concatenate(top1s).mean()),
        "greedy_agreement": float(min(r["greedy_agreement"] for r in per_prompt)),
        "greedy_identical": all(r["greedy_agreement"] == 1.0 for r in per_prompt),
        "ppl_reference": ppl_ref, "ppl_artifact": ppl_art, "ppl_delta": ppl_art - ppl_ref,
        "ppl_delta_rel": (ppl_art - ppl_ref) / ppl_ref,
    }
    report["thresholds"] = thresholds(manifest["precision"])
    report["failures"] = _failures(report, report["thresholds"])
    report["passed"] = not report["failures"]
    report["per_prompt"] = per_prompt
    if write:
        _write_report(d, manifest, report)
    return report


def _prompt_ids(model, prompts) -> list[list[int]]:
    """The check prompts as token ids; seeded random ids for an artifact without a tokenizer."""
    if model.tokenizer:
        return [model.encode(p) for p in prompts]
    rng = np.random.default_rng(0)
    return [rng.integers(0, model.config.vocab_size, 8 + 4 * i).tolist() for i in range(len(prompts))]


def _compare_prompt(model, ref, ids: list[int], n_tokens: int) -> tuple[dict, dict]:
    """One prompt: the artifact's greedy continuation through the runtime's decode loop, every logit
    row it computed (prefill and each decode step) against the reference's teacher-forced logits on
    the same tokens, and the reference's own greedy continuation. Returns (compare_logits, per-prompt row)."""
    eos = model.tokenizer.eos_ids if model.tokenizer else []
    rows = []
    out = [int(t[0]) for t in model.steps([ids], max_new_tokens=n_tokens, eos_ids=eos, on_logits=rows.append)]
    art = np.concatenate([r[0] for r in rows])  # [S + len(out) - 1, V]
    full = [ids + out[:-1]]
    T = len(full[0])
    ref_logits, _ = ref.backend.forward(full, np.ones((1, T), np.int64), np.arange(T)[None], ref.backend.empty_cache(1))
    ref_out = ref.generate_ids([ids], max_new_tokens=n_tokens, eos_ids=eos)[0]
    c = compare_logits(ref_logits[0], art)
    match = next((j for j, (a, b) in enumerate(zip(out, ref_out)) if a != b), min(len(out), len(ref_out)))
    frac = 1.0 if out == ref_out else match / max(len(out), len(ref_out))
    return c, {"prompt_tokens": len(ids), "artifact_tokens": out, "reference_tokens": ref_out,
               "greedy_agreement": frac, "max_abs_logit": c["max_abs"], "mean_kl": float(c["kl"].mean())}


GATES = (("max_abs_logit", "max_abs_logit", True), ("max_mean_kl", "mean_kl", True),
         ("min_top1_agreement", "top1_agreement", False), ("min_greedy_agreement", "greedy_agreement", False),
         ("max_ppl_delta_rel", "ppl_delta_rel", True))  # (threshold key, report metric, is an upper bound)


REPORTED = ("max_abs_logit", "mean_abs_logit", "mean_kl", "max_kl", "top1_agreement", "ppl_artifact", "ppl_delta_rel")


def _failures(report: dict, th: dict) -> list[str]:
    # a NaN compares false with every budget, and an ungated metric has none: any NaN fails
    failures = [f"{m} is {report[m]}" for m in REPORTED if not np.isfinite(report[m])]
    for key, metric, upper in GATES:
        lim = th.get(key)
        if lim is None:
            continue
        val = abs(report[metric]) if key == "max_ppl_delta_rel" else report[metric]
        if np.isfinite(val) and ((val > lim) if upper else (val < lim)):
            failures.append(f"{metric} {val:.4g} {'>' if upper else '<'} {lim:g}")
    return failures


def _write_report(d: Path, manifest: dict, report: dict):
    """DIR/parity.json (atomically) and the manifest's parity summary."""
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(d / "parity.json", lambda f: f.write(text.encode()))
    manifest["parity"] = {k: report[k] for k in ("passed", "backend", "max_abs_logit", "mean_kl",
                                                 "top1_agreement", "greedy_agreement", "ppl_delta_rel")}
    write_manifest(d, manifest)


def _perplexities(model, ref, cfg) -> tuple[float, float]:
    """Perplexity of the held-out text (first chunk that fits the context) under both models
    (ref: the reference behind a LlamaModel), one teacher-forced forward each."""
    if model.tokenizer:
        ids = model.encode(heldout_text())
    else:
        ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 256).tolist()
    ids = ids[: min(len(ids), cfg.max_seq_len, 512)]
    T = len(ids)
    feed = (np.array([ids]), np.ones((1, T), np.int64), np.arange(T)[None])
    art, _ = model.backend.forward(*feed, model.backend.empty_cache(1))
    rl, _ = ref.backend.forward(*feed, ref.backend.empty_cache(1))
    target = np.array(ids[1:])

    def ppl(logits):
        lp = _log_softmax(np.asarray(logits)[0, :-1])
        return float(np.exp(-lp[np.arange(T - 1), target].mean()))

    return ppl(rl), ppl(art)


def format_report(r: dict) -> str:
    th = r["thresholds"]
    lines = [f"parity: {r['artifact']} ({r['precision']}) vs {r['reference']}",
             f"  {r['prompts']} prompts, {r['greedy_tokens']} greedy tokens each"]
    rows = [("max |dlogit|", r["max_abs_logit"], th.get("max_abs_logit"), "<="),
            ("mean |dlogit|", r["mean_abs_logit"], None, ""),
            ("mean KL", r["mean_kl"], th.get("max_mean_kl"), "<="),
            ("max KL", r["max_kl"], None, ""),
            ("top-1 agreement", r["top1_agreement"], th.get("min_top1_agreement"), ">="),
            ("greedy agreement", r["greedy_agreement"], th.get("min_greedy_agreement"), ">="),
            ("perplexity ref", r["ppl_reference"], None, ""),
            ("perplexity artifact", r["ppl_artifact"], None, ""),
            ("perplexity delta (rel)", r["ppl_delta_rel"], th.get("max_ppl_delta_rel"), "|x| <=")]
    for name, val, lim, op in rows:
        gate = f"  (budget {op} {lim:g})" if lim is not None else ""
        lines.append(f"  {name:<24}{val:12.4g}{gate}")
    lines.append("PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"]))
    return "\n".join(lines)
