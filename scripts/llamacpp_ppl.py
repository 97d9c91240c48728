#!/usr/bin/env python
"""llama.cpp's perplexity of a GGUF over a text, with llama-cpp-python, in exactly the windows of
llama.cpp's `llama-perplexity` (tools/perplexity/perplexity.cpp): the reference figure for
`llamaexport eval`.

    python scripts/llamacpp_ppl.py MODEL.gguf --text FILE [--ctx 512] [--stride S] [--chunks N] [--threads N]
    python scripts/llamacpp_ppl.py --write-python-docs FILE    # the text docs/accuracy.md's figures use

The text of docs/accuracy.md's figures is Python's own documentation as the standard library ships it
(`pydoc_data.topics`, the Language Reference topics behind `help()`): the topics in sorted order,
joined by blank lines, the first 100,000 characters (24,448 SmolLM2 tokens with Python 3.11.7's copy).

Prints one JSON object: ppl, its ± (llama.cpp's), tokens, n_chunks, tokens scored, the sha256 of
the text's token ids (to check that both sides tokenized alike) and the llama-cpp-python version.
Needs only llama-cpp-python (and numpy); it does not import llamaexport, so the windows and the
scoring here are an independent rendering of llama.cpp's code, not a copy of ours:

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

Each window is one `Llama.eval` from an empty cache with `logits_all=True` and n_batch = the window.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np


def python_docs_text(chars: int = 100_000) -> str:
    """A natural-language text that every Python installation has on disk: see the module docstring."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def read_text(path) -> bytes:
    data = open(path, "rb").read()
    return data[:-1] if data.endswith(b"\n") else data


def llamacpp_perplexity(gguf, text_file, *, ctx: int = 512, stride: int | None = None, chunks: int | None = None,
                        threads: int | None = None) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    length = ctx + (stride // 2 if stride else 0)
    threads = threads or os.cpu_count()
    llm = Llama(model_path=str(gguf), n_ctx=length, n_batch=length, n_ubatch=length, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos, bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab)), llama_cpp.llama_vocab_bos(vocab)
    tokens = llm.tokenize(read_text(text_file), add_bos=True, special=False)  # add_bos here = add_special
    if len(tokens) < 2 * length:
        raise SystemExit(f"the text is {len(tokens)} tokens; a window of {length} needs at least {2 * length}")
    if stride:
        n = (len(tokens) - length + stride - 1) // stride
        starts, first = [i * stride for i in range(n)], length - stride - 1
    else:
        starts, first = [i * ctx for i in range(len(tokens) // ctx)], ctx // 2
    starts = starts[:chunks] if chunks else starts
    nll = []
    for start in starts:
        window = list(tokens[start:start + length])
        if add_bos and not stride:
            window[0] = bos
        llm.reset()  # n_past = 0: eval drops the cache beyond it
        llm.eval(window)
        logits = np.asarray(llm.scores[:length], np.float32)
        for j in range(first, length - 1):
            row = logits[j]
            mx = row.max()
            sum_exp = np.exp(row - mx).sum(dtype=np.float64)
            nll.append(-(float(row[tokens[start + j + 1]]) - float(mx) - np.log(sum_exp)))
        print(f"[{len(nll) // (length - 1 - first)}]{np.exp(np.mean(nll)):.4f}", end=",", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    v = np.array(nll)
    mean, var = v.mean(), (v * v).mean() - v.mean() ** 2
    ppl = float(np.exp(mean))
    return {"gguf": str(gguf), "text": str(text_file), "ctx": ctx, "stride": stride, "window": length,
            "tokens": len(tokens), "n_chunks": len(starts), "tokens_scored": len(v),
            "ppl": ppl, "ppl_se": ppl * float(np.sqrt(var / (len(v) - 1))) if var > 0 else 0.0,
            "tokens_sha256": hashlib.sha256(np.asarray(tokens, "<i4").tobytes()).hexdigest(),
            "add_bos": add_bos, "threads": threads, "llama_cpp_python": llama_cpp.__version__}


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--write-python-docs"] and len(sys.argv) == 3:
        open(sys.argv[2], "w", encoding="utf-8").write(python_docs_text())
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int)
    ap.add_argument("--chunks", type=int)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    print(json.dumps(llamacpp_perplexity(a.gguf, a.text, ctx=a.ctx, stride=a.stride, chunks=a.chunks,
                                         threads=a.threads), indent=2))


if __name__ == "__main__":
    main()
