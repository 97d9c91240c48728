#!/usr/bin/env python
"""llama.cpp's perplexity of a GGUF over a text, with llama-cpp-python, in exactly the windows of
llama.cpp's `llama-perplexity` (tools/perplexity/perplexity.cpp): the reference figure for
`llamaexport eval`; with --base-logits, the same comparison `llamaexport eval --base-logits` reports
(KL, same top token, Δppl) against a base saved by `llamaexport eval --save-logits`; and llama.cpp's
own quantizer, to make the GGUFs to compare.

    python scripts/llamacpp_ppl.py MODEL.gguf --text FILE [--ctx 512] [--stride S] [--chunks N] [--threads N]
    python scripts/llamacpp_ppl.py MODEL.gguf --text FILE --base-logits BASE.npz    # + KL / same top / Δppl
    python scripts/llamacpp_ppl.py SRC.gguf --quantize {F32,Q8_0,Q4_0} --out DST.gguf [--allow-requantize]
    python scripts/llamacpp_ppl.py --write-python-docs FILE    # the text docs/accuracy.md's figures use

The text of docs/accuracy.md's figures is Python's own documentation as the standard library ships it
(`pydoc_data.topics`, the Language Reference topics behind `help()`): the topics in sorted order,
joined by blank lines, the first 100,000 characters (24,448 SmolLM2 tokens with Python 3.11.7's copy).

Prints one JSON object: ppl, its ± (llama.cpp's), tokens, n_chunks, tokens scored, the sha256 of
the text's token ids (to check that both sides tokenized alike), the evaluation's tokens/s and the
llama-cpp-python version; with --base-logits also "base", the fields of `eval --json`'s "base".
Needs llama-cpp-python and numpy, plus this checkout's `llamaexport.verify.eval` (numpy only: no onnxruntime,
torch or tokenizer is imported), which the script puts on sys.path itself. The windows and the
perplexity here are an independent rendering of llama.cpp's code, not a copy of ours:

- the text is the file's bytes less one trailing newline (llama.cpp's `-f`), tokenized with
  add_special (BOS when the vocabulary adds it) and without parsing special tokens;
- default: n_tokens // ctx windows of ctx tokens, the first token of each replaced by BOS when the
  vocabulary adds BOS; logits at positions ctx/2 .. ctx-2 score the next token (`perplexity()`);
- --stride S (`--ppl-stride`, `perplexity_v2()`): windows of ctx + S/2 tokens every S tokens,
  the last S tokens of each scored, no BOS substituted (llama.cpp swaps it in after building the
  batch). llama-perplexity gets windows of ctx + S/2 only when its batch is not larger than the
  context (`-b` <= `-c`); with a larger batch it widens the context to a multiple of -c first;
- log-softmax as llama.cpp's: exp in float32, the sum in float64; ppl = exp(mean NLL),
  ± = ppl * sqrt((mean(NLL²) - mean(NLL)²) / (count - 1)).

The base comparison is eval.py's, imported rather than copied so the two report one definition:
`load_base` reads the file, `check_base` refuses a base of another text, ctx/stride, chunk count,
tokenizer (eval.py's fingerprint of llama.cpp's vocabulary: every token's text, BOS id and rule)
or token ids, `score_rows` gives the per-token KL(base || llama.cpp) over the base's top-k ids plus
one bucket for the rest and the same-top flag, `compare_with_base` the mean/p99 KL, top-1 agreement and
Δppl with their ±. ctx, stride and chunks default to the base's.

Each window is one `Llama.eval` from an empty cache with `logits_all=True` and n_batch = the window.
--quantize runs `llama_model_quantize` with `llama_model_quantize_default_params()` (what
`llama-quantize SRC DST TYPE` does); a source whose tensors are already quantized needs
--allow-requantize (llama.cpp dequantizes them to float32 first).
"""
import argparse
import collections
import ctypes
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's llamaexport, for its eval.py
from llamaexport import LlamaExportError  # noqa: E402
from llamaexport.verify import eval as ev  # noqa: E402  numpy only

QUANT_TYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def python_docs_text(chars: int = 100_000) -> str:
    """A natural-language text that every Python installation has on disk: see the module docstring."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def read_text(path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise LlamaExportError(f"text file {p} not found; give --text a text file")
    data = p.read_bytes()
    return data[:-1] if data.endswith(b"\n") else data


# ---------------------------------------------------------------------------------------------- windows
def cut_windows(n_tokens: int, *, ctx: int, stride: int | None = None, chunks: int | None = None) -> dict:
    """perplexity.cpp's windows: starts, length and the first scored logit row."""
    length = ctx + (stride // 2 if stride else 0)
    if n_tokens < 2 * length:
        raise LlamaExportError(f"the text is {n_tokens} tokens; a window of {length} needs at least {2 * length}: "
                               "give a smaller --ctx or a longer text")
    if stride:
        n = (n_tokens - length + stride - 1) // stride
        starts, first = [i * stride for i in range(n)], length - stride - 1
    else:
        starts, first = [i * ctx for i in range(n_tokens // ctx)], ctx // 2
    return {"starts": starts[:chunks] if chunks else starts, "length": length, "first": first, "stride": stride}


def score_windows(tokens, win: dict, logits_of, *, bos: int | None = None, base: dict | None = None,
                  progress: bool = True) -> dict:
    """Score every window of `win` (cut_windows) with logits_of(window ids) -> [length, V], one forward from
    an empty cache. bos: the id that replaces each window's first token (None: the vocabulary adds no BOS;
    never in strided mode). Returns the NLL of each scored token [n] in text order, the seconds spent, and
    with a base (eval.load_base's dict) the per-token KL(base || this) and same-top flag [n] as eval.py
    computes them."""
    L, first = win["length"], win["first"]
    per = L - 1 - first  # scored rows per window
    nll, kl, same = [], [], []
    t0 = time.perf_counter()
    for i, start in enumerate(win["starts"]):
        window = [int(t) for t in tokens[start:start + L]]
        if bos is not None and not win["stride"]:
            window[0] = bos
        logits = np.asarray(logits_of(window), np.float32)  # [L, V]: row j predicts token j + 1
        for j in range(first, L - 1):
            row = logits[j]
            mx = row.max()
            sum_exp = np.exp(row - mx).sum(dtype=np.float64)
            nll.append(-(float(row[tokens[start + j + 1]]) - float(mx) - np.log(sum_exp)))
        if base is not None:
            rows = slice(i * per, (i + 1) * per)
            s = ev.score_rows(logits[first:L - 1], np.asarray(tokens[start + first + 1:start + L], np.int64),
                              k=base["ids"].shape[1], base={key: base[key][rows] for key in ("ids", "lp", "rest")})
            kl.append(s["kl"])
            same.append(s["same_top"])
        if progress:
            print(f"[{i + 1}]{np.exp(np.mean(nll)):.4f}", end=",", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    out = {"nll": np.array(nll), "seconds": time.perf_counter() - t0}
    if base is not None:
        out |= {"kl": np.concatenate(kl), "same_top": np.concatenate(same)}
    return out


def perplexity(nll: np.ndarray) -> tuple[float, float]:
    """ppl and the standard error of mean(NLL) (llama.cpp's: sqrt((mean(v²) - mean²) / (count - 1)))."""
    v = np.asarray(nll, np.float64)
    mean, var = v.mean(), (v * v).mean() - v.mean() ** 2
    return float(np.exp(mean)), float(np.sqrt(var / (len(v) - 1))) if var > 0 else 0.0


# ---------------------------------------------------------------------------------------------- base
def check_base(base: dict, path, *, win: dict, ctx: int, text: bytes, tokens, tokenizer, vocab: int):
    """eval.py's refusals of a base from another text, window, chunk count, tokenizer or vocabulary.
    tokenizer: an object with bos_id, add_bos, vocab_size and id_to_piece (LlamaVocab, or ours)."""
    ev.check_base(base, path, ctx=ctx, stride=win["stride"], chunks_run=len(win["starts"]),
                  text_sha=hashlib.sha256(text).hexdigest(), tok_sha=ev.tokenizer_fingerprint(tokenizer),
                  tokens=np.asarray(tokens, np.int64), vocab=vocab)


def compare_with_base(base: dict, path, scored: dict) -> dict:
    """`eval --json`'s "base" object for this run's scored tokens (score_windows with the base)."""
    nll = scored["nll"]
    ppl, se = perplexity(nll)
    return ev.compare_with_base(base, str(path), scored, nll, ppl, se)


class LlamaVocab:
    """llama.cpp's vocabulary as eval.tokenizer_fingerprint reads a tokenizer: every token's text in
    id order (the GGUF's tokenizer.ggml.tokens, as our tokenizer's pieces), the BOS id and whether
    the vocabulary adds it."""

    def __init__(self, llm):
        import llama_cpp

        self._ll, self._vocab = llama_cpp, llama_cpp.llama_model_get_vocab(llm.model)
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.bos_id = int(bos) if bos >= 0 else None  # LLAMA_TOKEN_NULL (-1): no BOS
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)) and self.bos_id is not None
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))

    def id_to_piece(self, i: int) -> str:
        return self._ll.llama_vocab_get_text(self._vocab, i).decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------- llama.cpp
def llamacpp_perplexity(gguf, text_file, *, ctx: int | None = None, stride: int | None = None,
                        chunks: int | None = None, threads: int | None = None, base_logits=None,
                        progress: bool = True) -> dict:
    """llama.cpp's perplexity of `gguf` over `text_file` (module docstring); with base_logits, also the
    comparison with that `llamaexport eval --save-logits` file (report["base"]). ctx, stride and chunks
    default to the base's, else ctx 512."""
    base = ev.load_base(base_logits) if base_logits is not None else None
    if base is not None:
        bm = base["meta"]
        ctx, stride = (bm.get("ctx"), bm.get("stride")) if ctx is None and stride is None else (ctx, stride)
        chunks = bm.get("n_chunks") if chunks is None else chunks
    ctx = ev.DEFAULT_CTX if ctx is None else ctx
    text = read_text(text_file)
    if not Path(gguf).is_file():
        raise LlamaExportError(f"GGUF {gguf} not found")

    import llama_cpp
    from llama_cpp import Llama

    length = ctx + (stride // 2 if stride else 0)
    threads = threads or os.cpu_count()
    llm = Llama(model_path=str(gguf), n_ctx=length, n_batch=length, n_ubatch=length, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = LlamaVocab(llm)
    tokens = llm.tokenize(text, add_bos=True, special=False)  # add_bos here = add_special
    win = cut_windows(len(tokens), ctx=ctx, stride=stride, chunks=chunks)
    if base is not None:
        check_base(base, base_logits, win=win, ctx=ctx, text=text, tokens=tokens, tokenizer=vocab, vocab=llm.n_vocab())

    def logits_of(window):
        llm.reset()  # n_past = 0: eval drops the cache beyond it
        llm.eval(window)
        return llm.scores[:length]

    scored = score_windows(tokens, win, logits_of, bos=vocab.bos_id if vocab.add_bos else None, base=base,
                           progress=progress)
    ppl, se = perplexity(scored["nll"])
    n_chunks, secs = len(win["starts"]), scored["seconds"]
    desc = ctypes.create_string_buffer(128)  # llama.cpp's "llama ?B Q8_0"-style description
    llama_cpp.llama_model_desc(llm.model, desc, len(desc))
    report = {"gguf": str(gguf), "model": desc.value.decode(), "text": str(text_file),
              "text_sha256": hashlib.sha256(text).hexdigest(),
              "ctx": ctx, "stride": stride, "window": length,
              "tokens": len(tokens), "n_chunks": n_chunks, "tokens_scored": len(scored["nll"]),
              "bos_first": bool(vocab.add_bos and not stride),
              "ppl": ppl, "ppl_se": ppl * se, "nll": float(np.mean(scored["nll"])),
              "tokens_sha256": hashlib.sha256(np.asarray(tokens, "<i4").tobytes()).hexdigest(),
              "seconds": secs, "tokens_per_s": n_chunks * length / secs, "scored_tokens_per_s": len(scored["nll"]) / secs,
              "add_bos": vocab.add_bos, "threads": threads, "llama_cpp_python": llama_cpp.__version__}
    if base is not None:
        report["base"] = compare_with_base(base, base_logits, scored)
    return report


def quantize(src, out, gtype: str, *, allow_requantize: bool = False, threads: int | None = None) -> dict:
    """llama.cpp's quantizer (llama-quantize's defaults) from `src` to `out` of type F32, Q8_0 or Q4_0;
    written to a temporary sibling and renamed when complete."""
    src, out = Path(src), Path(out)
    if gtype not in QUANT_TYPES:
        raise LlamaExportError(f"--quantize {gtype}: give one of {', '.join(QUANT_TYPES)}")
    if not src.is_file():
        raise LlamaExportError(f"GGUF {src} not found")
    if out.exists():
        raise LlamaExportError(f"{out} exists; delete it or give another --out")
    if not out.parent.is_dir():
        raise LlamaExportError(f"cannot write {out}: directory {out.parent} does not exist")
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, QUANT_TYPES[gtype])
    p.allow_requantize = allow_requantize
    p.nthread = threads or os.cpu_count() or 1
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p))
        if rc != 0:
            raise LlamaExportError(f"llama_model_quantize {src} -> {gtype} failed (returned {rc}); a source with "
                                   "quantized tensors needs --allow-requantize")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    report = {"src": str(src.resolve()), "out": str(out.resolve()), "type": gtype, "allow_requantize": allow_requantize,
              "bytes": out.stat().st_size, "llama_cpp_python": llama_cpp.__version__}
    try:
        import gguf
    except ImportError:  # the gguf package only adds the summary of tensor types
        return report
    tensors = gguf.GGUFReader(str(out)).tensors
    report["tensor_types"] = dict(collections.Counter(t.tensor_type.name for t in tensors))
    report["matrices_not_" + gtype] = {t.name: t.tensor_type.name for t in tensors
                                        if len(t.shape) > 1 and t.tensor_type.name != gtype}
    return report


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--write-python-docs"] and len(sys.argv) == 3:
        open(sys.argv[2], "w", encoding="utf-8").write(python_docs_text())
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--text", help="the text file (required unless --quantize)")
    ap.add_argument("--ctx", type=int, help="window (default: the base's, else 512)")
    ap.add_argument("--stride", type=int)
    ap.add_argument("--chunks", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--base-logits", help="a `llamaexport eval --save-logits` file to compare with")
    ap.add_argument("--quantize", choices=sorted(QUANT_TYPES), help="write --out with llama.cpp's quantizer instead")
    ap.add_argument("--out", help="the GGUF --quantize writes")
    ap.add_argument("--allow-requantize", action="store_true", help="quantize a source whose tensors are quantized")
    a = ap.parse_args(argv)
    try:
        if a.quantize:
            if not a.out or a.text or a.base_logits:
                raise LlamaExportError("--quantize needs --out and takes no --text or --base-logits")
            report = quantize(a.gguf, a.out, a.quantize, allow_requantize=a.allow_requantize, threads=a.threads)
        else:
            if not a.text:
                raise LlamaExportError("give --text FILE (or --quantize TYPE --out FILE)")
            report = llamacpp_perplexity(a.gguf, a.text, ctx=a.ctx, stride=a.stride, chunks=a.chunks,
                                         threads=a.threads, base_logits=a.base_logits)
    except LlamaExportError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
