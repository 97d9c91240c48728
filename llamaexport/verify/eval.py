"""`llamaexport eval`: perplexity of an artifact over a text, scored the way llama.cpp's
`llama-perplexity` scores it, and the divergence from a saved base run.

Windows (llama.cpp tools/perplexity/perplexity.cpp, `perplexity()`): the whole text is tokenized
once (BOS in front when the vocabulary adds one; llama.cpp's `-f` drops one trailing newline
first), cut into n_chunks = n_tokens // ctx consecutive windows of ctx tokens, and the first
token of each window is replaced by BOS when the vocabulary adds BOS. Each window is one forward
from an empty cache; the logits at positions ctx/2 .. ctx-2 score the tokens ctx/2+1 .. ctx-1,
so every scored token sees at least ctx/2 tokens of context. ppl = exp(mean NLL), and its ±
is llama.cpp's: ppl * sqrt((mean(NLL²) - mean(NLL)²) / (count - 1)).

Strided (`stride`, llama.cpp's `--ppl-stride`, `perplexity_v2()`): windows of ctx + stride/2
tokens start every `stride` tokens (n_chunks = ceil((n_tokens - window) / stride)) and each
scores its last `stride` tokens, so the scored spans tile the text and every scored token sees
at least ctx - stride/2 tokens. No BOS is substituted: llama.cpp's code swaps the BOS in only
after the batch was built, so its windows start with the text's own token, and so do ours.

Base comparison: `save_logits` stores, per scored position, the top-k token ids and their
log-probs plus the log of the mass outside them; `base_logits` reads such a file and compares
this run with it: KL(base || this) over the base's top-k ids plus one bucket for everything
else (a lower bound of the full KL by the log-sum inequality, equal to it when the rest holds
no mass), top-1 agreement, and the perplexity difference and ratio with llama.cpp's ±.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError, whole_number

DEFAULT_CTX = 512  # llama-perplexity's default -c
MIN_CTX = 16
TOP_K = 32
FORMAT = "llamaexport-eval-logits/1"
ROW_BLOCK = 1 << 23  # logits scored at once (rows = this // vocab): two float32 [rows, vocab] temporaries, 32 MiB each


# ---------------------------------------------------------------------------------------------- windows
def read_text(path) -> str:
    """The text as llama.cpp's `-f` reads it: the file's bytes, less one trailing newline."""
    p = Path(path)
    if not p.is_file():
        raise LlamaExportError(f"text file {p} not found; give --text a UTF-8 text file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamaExportError(f"{p} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    return text[:-1] if text.endswith("\n") else text


def check_ctx(ctx, *, stride=None, max_seq_len: int) -> int:
    """The window length (ctx, or ctx + stride/2 when strided) after checking both against the artifact."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < MIN_CTX or ctx % 2:
        raise LlamaExportError(f"--ctx must be an even number >= {MIN_CTX} (the second half of each window is scored), "
                               f"got {ctx!r}")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= ctx):
        raise LlamaExportError(f"--stride must be 1 .. --ctx ({ctx}), got {stride!r}")
    length = ctx + (stride // 2 if stride else 0)
    if length > max_seq_len:
        what = f"--ctx {ctx} + --stride {stride}/2 = {length}" if stride else f"--ctx {ctx}"
        most = max_seq_len - (stride // 2 if stride else 0)
        raise LlamaExportError(f"{what} exceeds the artifact's context ({max_seq_len}); give --ctx {most - most % 2} "
                               "or less, or rebuild with a larger --max-seq-len")
    return length


def windows(n_tokens: int, *, ctx: int, stride: int | None = None, chunks: int | None = None) -> dict:
    """The windows llama-perplexity evaluates: starts, length, the first scored logit row and
    whether the first token becomes BOS. Refuses a text shorter than two windows (as llama.cpp)."""
    length = ctx + (stride // 2 if stride else 0)
    if n_tokens < 2 * length:
        fit = n_tokens // 2 - (stride // 2 if stride else 0)
        fit -= fit % 2
        hint = (f"give --ctx {fit} or less, or a longer text" if fit >= MIN_CTX
                else f"give a text of at least {2 * (MIN_CTX + (stride // 2 if stride else 0))} tokens")
        what = f"a window of {length} tokens" if stride else f"--ctx {ctx}"
        raise LlamaExportError(f"the text is {n_tokens} tokens; perplexity with {what} needs at least {2 * length}: "
                               f"{hint}")
    if stride:
        n = (n_tokens - length + stride - 1) // stride
        starts, first, bos = [i * stride for i in range(n)], length - stride - 1, False
    else:
        n = n_tokens // ctx
        starts, first, bos = [i * ctx for i in range(n)], ctx // 2, True
    if chunks is not None:
        whole_number(chunks, "--chunks")
        starts = starts[:chunks]
    return {"starts": starts, "length": length, "first": first, "bos": bos}


# ---------------------------------------------------------------------------------------------- numerics
def _mean_se(v: np.ndarray) -> tuple[float, float]:
    """Mean and llama.cpp's uncertainty of it: sqrt((mean(v²) - mean²) / (count - 1))."""
    v = np.asarray(v, np.float64)
    mean = float(v.mean())
    var = float((v * v).mean()) - mean * mean
    return mean, (float(np.sqrt(var / (len(v) - 1))) if var > 0 and len(v) > 1 else 0.0)


def score_rows(logits: np.ndarray, targets: np.ndarray, *, k: int, base: dict | None):
    """logits [n, V] (the scored rows), targets [n]. Returns target log-probs [n], this run's top-k
    (ids int32 [n, k], log-probs [n, k], log of the mass outside them [n]) and, with a base block,
    the per-position KL [n] and top-1 agreement [n]. As llama.cpp's log_softmax: exp in float32,
    the sum in float64."""
    n = len(targets)
    out = {"target": np.empty(n), "ids": np.empty((n, k), np.int32), "lp": np.empty((n, k)), "rest": np.empty(n)}
    if base is not None:
        out |= {"kl": np.empty(n), "same_top": np.empty(n, bool)}
    step = max(1, ROW_BLOCK // logits.shape[1])
    for a in range(0, n, step):
        b = min(n, a + step)
        x = np.ascontiguousarray(logits[a:b], np.float32)  # [r, V]
        r = np.arange(b - a)[:, None]
        m = x.max(1, keepdims=True)
        e = np.exp(x - m)  # [r, V] float32, in (0, 1]
        total = e.sum(1, dtype=np.float64)
        lse = m[:, 0] + np.log(total)  # log of the softmax denominator
        out["target"][a:b] = x[r[:, 0], targets[a:b]] - lse
        top = np.argpartition(x, -k, axis=1)[:, -k:]
        top = np.take_along_axis(top, np.argsort(-x[r, top], axis=1, kind="stable"), 1)  # descending
        out["ids"][a:b], out["lp"][a:b] = top, x[r, top] - lse[:, None]
        out["rest"][a:b] = _log_rest(e, top, total)
        if base is not None:
            ids = base["ids"][a:b].astype(np.int64)
            this_lp = np.concatenate([x[r, ids] - lse[:, None], _log_rest(e, ids, total)[:, None]], 1)  # normalised
            base_lp = np.concatenate([base["lp"][a:b].astype(np.float64), base["rest"][a:b, None]], 1)
            base_lp -= _logsumexp(base_lp)[:, None]  # renormalised: the stored top-k log-probs are float16
            p = np.exp(base_lp)
            out["kl"][a:b] = np.where(p > 0, p * (base_lp - this_lp), 0.0).sum(1)
            out["same_top"][a:b] = x.argmax(1) == ids[:, 0]
    return out


def _log_rest(e: np.ndarray, ids: np.ndarray, total: np.ndarray) -> np.ndarray:
    """log of the probability outside `ids` per row, summed over the other entries themselves
    (1 - the top-k mass would cancel when the top-k holds nearly all of it). e [r, V] is
    exp(logit - max), zeroed at ids for the sum and restored; total [r] its row sums."""
    r = np.arange(len(e))[:, None]
    kept = e[r, ids]
    e[r, ids] = 0.0
    rest = e.sum(1, dtype=np.float64)
    e[r, ids] = kept
    with np.errstate(divide="ignore"):  # no mass outside: log 0 = -inf, a bucket with no weight
        return np.log(rest / total)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


# ---------------------------------------------------------------------------------------------- identity
def tokenizer_fingerprint(tok) -> str:
    """sha256 of the vocabulary (every piece in id order) and the BOS rule: two runs whose
    fingerprints match number tokens the same way."""
    h = hashlib.sha256(f"bos={tok.bos_id} add_bos={tok.add_bos} n={tok.vocab_size}\n".encode())
    for i in range(tok.vocab_size):
        h.update(tok.id_to_piece(i).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- files
def load_base(path) -> dict:
    """A file written by `save_logits`: {"meta": dict, "target", "ids", "lp", "rest", "tokens"}."""
    p = Path(path)
    if not p.is_file():
        raise LlamaExportError(f"base logits {p} not found; write it with `llamaexport eval BASE_DIR --text FILE "
                               f"--save-logits {p}`")
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            base = {"meta": meta, **{key: z[key] for key in ("tokens", "target", "target_lp", "ids", "lp", "rest")}}
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise LlamaExportError(f"cannot read base logits {p} ({type(e).__name__}: {str(e)[:120]}); give a file written "
                               "by `llamaexport eval --save-logits`") from None
    meta = base["meta"]
    n, k = base["ids"].shape if base["ids"].ndim == 2 else (-1, -1)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or n < 0 or base["lp"].shape != (n, k) \
            or any(base[key].shape != (n,) for key in ("rest", "target", "target_lp")):
        raise LlamaExportError(f"{p} is not a {FORMAT} file (written by `llamaexport eval --save-logits`); "
                               "write the base again with this llamaexport")
    return base


def check_base(base: dict, path, *, ctx, stride, chunks_run, text_sha, tok_sha, tokens, vocab):
    """Refuse a base scored on another text, tokenizer, vocabulary or windows (one line each)."""
    m = base["meta"]
    if m.get("text_sha256") != text_sha:
        raise LlamaExportError(f"base logits {path} were computed on another text (sha256 {str(m.get('text_sha256'))[:12]}"
                               f"…, this one {text_sha[:12]}…); give the same --text")
    if (m.get("ctx"), m.get("stride")) != (ctx, stride):
        raise LlamaExportError(f"base logits {path} were computed with --ctx {m.get('ctx')} --stride {m.get('stride')}, "
                               f"this run --ctx {ctx} --stride {stride}; use the base's (the defaults do)")
    if m.get("tokenizer_sha256") != tok_sha or not np.array_equal(base["tokens"], tokens):
        raise LlamaExportError(f"base logits {path} come from another tokenizer (the text's tokens differ); "
                               "compare artifacts of the same model")
    if m.get("vocab_size") != vocab or (base["ids"].size and int(base["ids"].max()) >= vocab):
        raise LlamaExportError(f"base logits {path} have a vocabulary of {m.get('vocab_size')}, this artifact {vocab}; "
                               "compare artifacts of the same model")
    if m.get("n_chunks") != chunks_run:
        raise LlamaExportError(f"base logits {path} cover {m.get('n_chunks')} chunks, this run {chunks_run}; "
                               f"give --chunks {m.get('n_chunks')}")


def _writable(path) -> Path:
    p = Path(path)
    if p.is_dir():
        raise LlamaExportError(f"--save-logits {p} is a directory; give a file name (e.g. {p}/base.npz)")
    if not p.parent.is_dir():
        raise LlamaExportError(f"cannot write {p}: directory {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise LlamaExportError(f"cannot write {p}: directory {p.parent} is not writable")
    return p


def _save(path: Path, meta: dict, arrays: dict):
    from llamaexport.artifact.manifest import write_atomically

    write_atomically(path, lambda f: np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays))


# ---------------------------------------------------------------------------------------------- evaluate
def evaluate(artifact, text_file, *, ctx: int | None = None, stride: int | None = None, chunks: int | None = None,
             save_logits=None, base_logits=None, top_k: int = TOP_K, backend: str | None = None,
             threads: int | None = None, progress: bool = True) -> dict:
    """Perplexity of `artifact` over `text_file` with llama-perplexity's windows (module
    docstring); returns the report dict. ctx, stride and chunks default to the base file's when
    `base_logits` is given, else ctx = min(512, the artifact's context). save_logits: write this
    run's top-`top_k` log-probs there (.npz); base_logits: compare with such a file. Needs
    numpy, onnxruntime (or the artifact's backend) and the tokenizer only."""
    from llamaexport.artifact.manifest import read_manifest
    from llamaexport.model.config import LlamaConfig
    from llamaexport.runtime.llama_model import LlamaModel

    # every check that needs no model first: a bad argument costs no session
    cfg = LlamaConfig.from_dict(read_manifest(artifact)["model"])
    text = read_text(text_file)
    base = load_base(base_logits) if base_logits is not None else None
    if base is not None:
        bm = base["meta"]
        ctx, stride = (bm.get("ctx"), bm.get("stride")) if ctx is None and stride is None else (ctx, stride)
        chunks = bm.get("n_chunks") if chunks is None else chunks
    if ctx is None:
        ctx = min(DEFAULT_CTX, cfg.max_seq_len - cfg.max_seq_len % 2)
    check_ctx(ctx, stride=stride, max_seq_len=cfg.max_seq_len)
    save_path = _writable(save_logits) if save_logits is not None else None
    whole_number(top_k, "top_k")

    with LlamaModel.load(artifact, threads=threads, backend=backend) as model:
        tok = model.require_tokenizer()
        # llama.cpp: common_tokenize(text, add_special=true, parse_special=false): BOS if the vocabulary adds it
        tokens = np.array(tok.encode(text, add_bos=tok.add_bos), np.int64)
        win = windows(len(tokens), ctx=ctx, stride=stride, chunks=chunks)
        k = min(top_k, cfg.vocab_size - 1)
        text_sha, tok_sha = _sha256(text.encode("utf-8")), tokenizer_fingerprint(tok)
        if base is not None:
            check_base(base, base_logits, ctx=ctx, stride=stride, chunks_run=len(win["starts"]), text_sha=text_sha,
                       tok_sha=tok_sha, tokens=tokens, vocab=cfg.vocab_size)
        scored = _run(model, tokens, win, k=k, base=base, progress=progress)
        manifest, threads_used = model.manifest, model.backend.threads

    nll = -scored["target"]
    mean, se = _mean_se(nll)
    ppl = float(np.exp(mean))
    L, n_chunks, secs = win["length"], len(win["starts"]), scored["seconds"]
    report = {
        "artifact": str(artifact), "precision": manifest["precision"],
        "backend": backend or manifest.get("backend", "onnxruntime"), "threads": threads_used,
        "text": str(text_file), "text_sha256": text_sha, "tokens": int(len(tokens)),
        "tokens_sha256": _sha256(tokens.astype("<i4").tobytes()),
        "mode": "strided" if stride else "chunks", "ctx": ctx, "stride": stride, "window": L, "n_chunks": n_chunks,
        "bos_first": bool(win["bos"] and tok.add_bos),
        "tokens_evaluated": n_chunks * L, "tokens_scored": int(len(nll)),
        "ppl": ppl, "ppl_se": ppl * se, "nll": mean,
        "seconds": secs, "tokens_per_s": n_chunks * L / secs, "scored_tokens_per_s": len(nll) / secs,
    }
    if base is not None:
        report["base"] = compare_with_base(base, base_logits, scored, nll, ppl, se)
    if save_path is not None:
        meta = {"format": FORMAT, "artifact": str(artifact), "precision": report["precision"],
                "backend": report["backend"], "ctx": ctx, "stride": stride, "n_chunks": n_chunks, "window": L,
                "first": win["first"], "top_k": k, "tokens": int(len(tokens)), "text_sha256": text_sha,
                "tokens_sha256": report["tokens_sha256"], "tokenizer_sha256": tok_sha,
                "vocab_size": cfg.vocab_size, "ppl": ppl}
        _save(save_path, meta, {"tokens": tokens.astype(np.int32), "target": scored["targets"].astype(np.int32),
                                "target_lp": scored["target"].astype(np.float32), "ids": scored["ids"],
                                "lp": scored["lp"].astype(np.float16), "rest": scored["rest"].astype(np.float32)})
        report["saved_logits"] = {"file": str(save_path), "top_k": k, "bytes": save_path.stat().st_size}
    return report


def _run(model, tokens: np.ndarray, win: dict, *, k: int, base: dict | None, progress: bool) -> dict:
    """One forward per window from an empty cache; the scored rows' statistics, in text order."""
    backend, L, first = model.backend, win["length"], win["first"]
    bos = model.tokenizer.bos_id if win["bos"] and model.tokenizer.add_bos else None
    per = L - 1 - first  # scored positions per window
    base_rows = None if base is None else {key: base[key] for key in ("ids", "lp", "rest")}
    parts = []
    bar = _progress(len(win["starts"]) * L, progress)
    mask, pos = np.ones((1, L), np.int64), np.arange(L, dtype=np.int64)[None]
    nll_sum, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        for i, start in enumerate(win["starts"]):
            ids = tokens[start:start + L].copy()
            targets = ids[first + 1:].copy()  # the text's own tokens (position 0 is never a target)
            if bos is not None:
                ids[0] = bos
            cache = backend.take_cache(1)
            try:
                logits, cache = backend.forward(ids[None], mask, pos, cache)
            finally:
                backend.give_back_cache(1, cache)
            rows = np.asarray(logits)[0, first:L - 1]  # [per, V]: row j predicts token j + 1
            block = None if base_rows is None else {key: v[i * per:(i + 1) * per] for key, v in base_rows.items()}
            s = score_rows(rows, targets, k=k, base=block)
            s["targets"] = targets
            parts.append(s)
            nll_sum, count = nll_sum - float(s["target"].sum()), count + per
            if bar is not None:
                bar.update(L)
                bar.set_postfix(ppl=f"{np.exp(nll_sum / count):.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out["seconds"] = seconds
    return out


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the build extra; the runtime path runs without it
        return None
    return tqdm(total=total, desc="eval", unit="tok", unit_scale=True, file=sys.stderr, leave=True)


def compare_with_base(base: dict, path, scored: dict, nll: np.ndarray, ppl: float, se: float) -> dict:
    """This run against the base run: KL(base || this) from the base's top-k, top-1 agreement,
    and the perplexity difference and ratio with llama.cpp's uncertainties (kl_divergence())."""
    kl = scored["kl"]
    kl_mean, kl_se = _mean_se(kl)
    same = scored["same_top"].astype(np.float64)
    same_p = float(same.mean())
    nll_b = -base["target_lp"].astype(np.float64)
    mean_b, se_b = _mean_se(nll_b)
    n = len(nll)
    cov = (float((nll * nll_b).mean()) - nll.mean() * mean_b) / (n - 1) if n > 1 else 0.0
    ppl_b = float(np.exp(mean_b))
    ln_ratio_se = float(np.sqrt(max(se * se + se_b * se_b - 2 * cov, 0.0)))
    ppl_se, ppl_b_se = ppl * se, ppl_b * se_b
    return {
        "file": str(path), "artifact": base["meta"].get("artifact"), "precision": base["meta"].get("precision"),
        "top_k": int(base["ids"].shape[1]),
        "topk_mass": float(np.exp(base["lp"].astype(np.float64)).sum(1).mean()),
        "mean_kl": kl_mean, "mean_kl_se": kl_se, "median_kl": float(np.median(kl)),
        "p99_kl": float(np.percentile(kl, 99)), "max_kl": float(kl.max()),
        "top1_agreement": same_p, "top1_agreement_se": float(np.sqrt(same_p * (1 - same_p) / (n - 1))) if n > 1 else 0.0,
        "ppl_base": ppl_b, "ppl_base_se": ppl_b_se,
        "ppl_delta": ppl - ppl_b,
        "ppl_delta_se": float(np.sqrt(max(ppl_se ** 2 + ppl_b_se ** 2 - 2 * ppl * ppl_b * cov, 0.0))),
        "ppl_ratio": ppl / ppl_b, "ppl_ratio_se": ppl / ppl_b * ln_ratio_se,
    }


def format_report(r: dict) -> str:
    mode = (f"strided: windows of {r['window']} every {r['stride']} tokens, the last {r['stride']} scored"
            if r["mode"] == "strided" else f"llama.cpp chunks: {'BOS first, ' if r['bos_first'] else ''}the second half scored")
    lines = [f"eval: {r['artifact']} ({r['precision']}, {r['backend']}) on {r['text']}",
             f"  {r['tokens']} tokens, ctx {r['ctx']}, {r['n_chunks']} chunks ({mode}), {r['tokens_scored']} scored",
             f"  perplexity          {r['ppl']:.4f} ± {r['ppl_se']:.4f}",
             f"  throughput          {r['tokens_per_s']:.1f} tokens/s evaluated, {r['scored_tokens_per_s']:.1f} "
             f"scored ({r['seconds']:.1f} s, {r['threads'] or 'n/a'} threads)"]
    b = r.get("base")
    if b:
        lines += [f"  vs base {b['file']} ({b['precision']}; KL over its top-{b['top_k']} + rest, "
                  f"{100 * b['topk_mass']:.1f}% of its mass)",
                  f"  mean KL             {b['mean_kl']:.6g} ± {b['mean_kl_se']:.3g}",
                  f"  p99 KL              {b['p99_kl']:.6g}   (max {b['max_kl']:.6g})",
                  f"  same top token      {100 * b['top1_agreement']:.3f} ± {100 * b['top1_agreement_se']:.3f} %",
                  f"  ppl base            {b['ppl_base']:.4f} ± {b['ppl_base_se']:.4f}",
                  f"  ppl delta           {b['ppl_delta']:+.4f} ± {b['ppl_delta_se']:.4f}   "
                  f"(ratio {b['ppl_ratio']:.5f} ± {b['ppl_ratio_se']:.5f})"]
    s = r.get("saved_logits")
    if s:
        lines.append(f"  saved top-{s['top_k']} log-probs to {s['file']} ({s['bytes'] / 2**20:.2f} MiB)")
    return "\n".join(lines)
