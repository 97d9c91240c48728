"""`llamaexport eval`: perplexity in llama-perplexity's windows against an independent computation
(the torch reference over windows cut here), the saved top-k base and its KL, refusals, the CLI's
JSON, and (when llama-cpp-python is importable) SmolLM2 against llama.cpp itself."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, cli, train_tiny_spm

from llamaexport import LlamaExportError
from llamaexport.verify.eval import evaluate, load_base

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from llamacpp_ppl import python_docs_text  # noqa: E402

CTX = 64


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("eval-text") / "docs.txt"
    p.write_text(python_docs_text(3000) + "\n", encoding="utf-8")  # eval drops the trailing newline, as llama.cpp
    return p


@pytest.fixture(scope="module")
def reference(tiny_artifact):
    """The float32 torch reference of the tiny artifact (random weights, seed 7) and its tokenizer."""
    from llamaexport.artifact.manifest import read_manifest
    from llamaexport.model.checkpoint import random_checkpoint
    from llamaexport.model.config import LlamaConfig
    from llamaexport.model.reference import ReferenceBackend, build_reference
    from llamaexport.model.tokenizer import load_tokenizer

    m = read_manifest(tiny_artifact)
    cfg = LlamaConfig.from_dict(m["model"])
    assert m["source"] == {"kind": "random", "seed": 7}
    return ReferenceBackend(build_reference(cfg, random_checkpoint(cfg, 7).weights)), load_tokenizer(tiny_artifact)


def _full_logits(backend, ids) -> np.ndarray:
    T = len(ids)
    logits, _ = backend.forward(np.array([ids]), np.ones((1, T), np.int64), np.arange(T)[None], backend.empty_cache(1))
    return np.asarray(logits[0], np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _windows_by_hand(ids, ctx, stride, bos):
    """(window token ids, first scored row, the text's tokens they predict) as perplexity.cpp cuts them."""
    out = []
    if stride is None:  # perplexity(): n_tokens // ctx windows, BOS first, rows ctx/2 .. ctx-2
        for i in range(len(ids) // ctx):
            w = ids[i * ctx:(i + 1) * ctx]
            out.append(([bos] + w[1:], ctx // 2, w[ctx // 2 + 1:]))
    else:  # perplexity_v2(): windows of ctx + stride/2 every stride tokens, the last stride tokens scored
        n = ctx + stride // 2
        for start in range(0, len(ids) - n, stride):
            w = ids[start:start + n]
            out.append((w, n - stride - 1, w[n - stride:]))
    return out


@pytest.mark.parametrize("stride", [None, 16])
def test_perplexity_equals_the_reference_over_llamacpp_windows(tiny_artifact, text_file, reference, stride):
    ref, tok = reference
    r = evaluate(tiny_artifact, text_file, ctx=CTX, stride=stride, progress=False)
    ids = tok.encode(text_file.read_text(encoding="utf-8")[:-1])
    assert tok.add_bos and ids[0] == tok.bos_id and r["tokens"] == len(ids)
    nll = []
    for w, first, targets in _windows_by_hand(ids, CTX, stride, tok.bos_id):
        lp = _log_softmax(_full_logits(ref, w))
        nll += [-lp[first + j, t] for j, t in enumerate(targets)]
    nll = np.array(nll)
    want = np.exp(nll.mean())
    assert r["tokens_scored"] == len(nll) and r["n_chunks"] == len(_windows_by_hand(ids, CTX, stride, tok.bos_id))
    assert r["ppl"] == pytest.approx(want, rel=1e-4)
    se = want * np.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / (len(nll) - 1))  # llama.cpp's ±
    assert r["ppl_se"] == pytest.approx(se, rel=1e-3)
    assert r["window"] == CTX + (stride // 2 if stride else 0)
    assert r["tokens_evaluated"] == r["n_chunks"] * r["window"]
    if stride is None:  # the BOS substitution matters: without it the figure is another one
        raw = []
        for i in range(len(ids) // CTX):
            lp = _log_softmax(_full_logits(ref, ids[i * CTX:(i + 1) * CTX]))
            raw += [-lp[j, ids[i * CTX + j + 1]] for j in range(CTX // 2, CTX - 1)]
        assert abs(np.exp(np.mean(raw)) / r["ppl"] - 1) > 1e-3


@pytest.fixture(scope="module")
def base_file(tiny_artifact, text_file, tmp_path_factory):
    p = tmp_path_factory.mktemp("eval-base") / "tiny-fp32.npz"
    r = evaluate(tiny_artifact, text_file, ctx=CTX, save_logits=p, progress=False)
    return p, r


def test_saved_logits_are_the_runs_top_k_and_small(tiny_artifact, text_file, base_file, reference):
    path, r = base_file
    base = load_base(path)
    n, k = r["tokens_scored"], 32
    assert base["ids"].shape == (n, k) and base["ids"].dtype == np.int32 and base["lp"].dtype == np.float16
    assert base["meta"]["ctx"] == CTX and base["meta"]["ppl"] == r["ppl"]
    assert r["saved_logits"]["bytes"] == path.stat().st_size < n * (6 * k + 16) + 4 * r["tokens"] + 8192
    # the first scored position, by hand: the top-32 of the reference, in order, and the mass outside them
    ref, tok = reference
    ids = tok.encode(text_file.read_text(encoding="utf-8")[:-1])
    lp = _log_softmax(_full_logits(ref, [tok.bos_id] + ids[1:CTX]))[CTX // 2]
    top = np.argsort(-lp)[:k]
    assert list(base["ids"][0][:8]) == list(top[:8])  # beyond, near-ties of the two computations may swap
    np.testing.assert_allclose(base["lp"][0].astype(np.float64), np.sort(lp)[::-1][:k], atol=2e-3)
    rest = np.log(1 - np.exp(lp[base["ids"][0]]).sum())
    assert base["rest"][0] == pytest.approx(rest, abs=1e-4)
    assert base["target"][0] == ids[CTX // 2 + 1] and base["target_lp"][0] == pytest.approx(lp[ids[CTX // 2 + 1]], abs=1e-4)


def test_the_same_artifact_against_its_own_base_reads_zero(tiny_artifact, text_file, base_file):
    path, first = base_file
    r = evaluate(tiny_artifact, text_file, base_logits=path, progress=False)  # ctx from the base file
    b = r["base"]
    assert r["ctx"] == CTX and r["ppl"] == first["ppl"]
    assert b["top1_agreement"] == 1.0 and 0 <= b["mean_kl"] < 1e-6 and b["p99_kl"] < 1e-5
    assert abs(b["ppl_delta"]) < 1e-5 * r["ppl"] and b["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def other_tiny(tiny_artifact, tmp_path_factory):
    """Another model with the same tokenizer: the tiny config, seed 8 instead of 7."""
    from llamaexport.build.pipeline import build

    tok = tiny_artifact / "tokenizer.model"
    return build(out=tmp_path_factory.mktemp("tiny-seed8") / "art", size="tiny", seed=8, tokenizer=str(tok),
                 progress=False)


def test_kl_against_another_artifact_is_the_full_kl_when_the_top_k_is_the_vocabulary(
        tiny_artifact, other_tiny, text_file, tmp_path):
    """top_k = V-1 leaves one token in the rest bucket, so the bucketed KL is the full KL (up to the
    float16 storage); the default top-32 gives a lower bound of it. Full KL by hand from both artifacts'
    logits over the same windows."""
    from llamaexport.model.tokenizer import load_tokenizer
    from llamaexport.runtime.llama_model import LlamaModel

    tok = load_tokenizer(tiny_artifact)
    ids = tok.encode(text_file.read_text(encoding="utf-8")[:-1])
    kl, top1 = [], []
    with LlamaModel.load(tiny_artifact) as a, LlamaModel.load(other_tiny) as b:
        for w, first, _ in _windows_by_hand(ids, CTX, None, tok.bos_id):
            la, lb = (_log_softmax(_full_logits(m.backend, w))[first:CTX - 1] for m in (a, b))
            kl.append((np.exp(la) * (la - lb)).sum(-1))
            top1.append(la.argmax(-1) == lb.argmax(-1))
    full, top1 = np.concatenate(kl), np.concatenate(top1)
    evaluate(tiny_artifact, text_file, ctx=CTX, save_logits=tmp_path / "all.npz", top_k=511, progress=False)
    base = evaluate(tiny_artifact, text_file, ctx=CTX, save_logits=tmp_path / "k32.npz", progress=False)
    run = evaluate(other_tiny, text_file, base_logits=tmp_path / "k32.npz", progress=False)
    k32 = run["base"]
    whole = evaluate(other_tiny, text_file, base_logits=tmp_path / "all.npz", progress=False)["base"]
    assert full.mean() > 1e-3  # the comparison has something to find
    assert whole["mean_kl"] == pytest.approx(full.mean(), rel=0.02)
    assert whole["p99_kl"] == pytest.approx(np.percentile(full, 99), rel=0.05)
    assert 0 < k32["mean_kl"] <= whole["mean_kl"] * 1.001 and k32["topk_mass"] < whole["topk_mass"]
    assert k32["top1_agreement"] == whole["top1_agreement"] == pytest.approx(top1.mean(), abs=2 / len(top1))
    assert k32["top1_agreement"] < 1.0
    assert k32["ppl_base"] == pytest.approx(base["ppl"], rel=1e-6) and k32["ppl_delta"] == pytest.approx(
        run["ppl"] - base["ppl"], abs=1e-5 * base["ppl"])


def test_llamacpp_script_compares_with_a_base_as_eval_does(other_tiny, text_file, base_file):
    """scripts/llamacpp_ppl.py's --base-logits path (its own windows and NLL, eval.py's KL and
    comparison) fed another model's logits reads what `eval --base-logits` reads for that model:
    the same rows meet the same base rows. Our runtime stands in for llama.cpp's logits here."""
    from llamacpp_ppl import check_base, compare_with_base, cut_windows, perplexity, read_text, score_windows

    from llamaexport.runtime.llama_model import LlamaModel

    path, _ = base_file
    want = evaluate(other_tiny, text_file, base_logits=path, progress=False)
    base, text = load_base(path), read_text(text_file)
    with LlamaModel.load(other_tiny) as m:
        tok, backend = m.require_tokenizer(), m.backend
        tokens = tok.encode(text.decode("utf-8"), add_bos=tok.add_bos)
        win = cut_windows(len(tokens), ctx=CTX)
        check_base(base, path, win=win, ctx=CTX, text=text, tokens=tokens, tokenizer=tok, vocab=512)

        def logits_of(w):
            cache = backend.take_cache(1)
            try:
                logits, cache = backend.forward(np.array([w]), np.ones((1, len(w)), np.int64),
                                                np.arange(len(w))[None], cache)
            finally:
                backend.give_back_cache(1, cache)
            return np.asarray(logits)[0]

        scored = score_windows(tokens, win, logits_of, bos=tok.bos_id, base=base, progress=False)
    got = compare_with_base(base, path, scored)
    assert len(scored["nll"]) == want["tokens_scored"] and perplexity(scored["nll"])[0] == pytest.approx(want["ppl"], rel=1e-9)
    assert got.keys() == want["base"].keys() and got["top1_agreement"] == want["base"]["top1_agreement"] < 1
    for key, v in want["base"].items():
        assert got[key] == (v if isinstance(v, str) or v is None else pytest.approx(v, rel=1e-6, abs=1e-12)), key
    assert got["mean_kl"] > 1e-3


def test_llamacpp_script_refuses_a_mismatched_base_and_bad_quantize_arguments(tiny_artifact, text_file, base_file,
                                                                               tmp_path):
    from llamacpp_ppl import check_base, cut_windows, quantize, read_text

    from llamaexport.model.tokenizer import load_tokenizer

    path, _ = base_file
    base, tok, text = load_base(path), load_tokenizer(tiny_artifact), read_text(text_file)
    tokens = tok.encode(text.decode("utf-8"))
    args = dict(ctx=CTX, text=text, tokens=tokens, tokenizer=tok, vocab=512)
    check_base(base, path, win=cut_windows(len(tokens), ctx=CTX), **args)  # the matching run passes
    with pytest.raises(LlamaExportError, match="computed on another text"):
        check_base(base, path, win=cut_windows(len(tokens), ctx=CTX), **(args | {"text": text[::-1]}))
    with pytest.raises(LlamaExportError, match="cover [0-9]+ chunks, this run 2; give --chunks"):
        check_base(base, path, win=cut_windows(len(tokens), ctx=CTX, chunks=2), **args)
    with pytest.raises(LlamaExportError, match="come from another tokenizer"):
        check_base(base, path, win=cut_windows(len(tokens), ctx=CTX), **(args | {"tokens": tokens[:1] + tokens[2:] + [5]}))
    src = tmp_path / "a.gguf"
    src.write_bytes(b"GGUF")
    for kw, msg in [(dict(src=tmp_path / "none.gguf", out=tmp_path / "b.gguf", gtype="Q8_0"), "not found"),
                    (dict(src=src, out=src, gtype="Q8_0"), "exists; delete it or give another --out"),
                    (dict(src=src, out=tmp_path / "no" / "b.gguf", gtype="Q8_0"), "does not exist"),
                    (dict(src=src, out=tmp_path / "b.gguf", gtype="Q5_K"), "give one of F32, Q8_0, Q4_0")]:
        with pytest.raises(LlamaExportError, match=msg):
            quantize(**kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


# ---- refusals: one line naming the problem and the fix

def test_bad_arguments_are_one_line(tiny_artifact, text_file, tmp_path):
    from llamaexport.model.tokenizer import load_tokenizer

    short = tmp_path / "short.txt"
    short.write_text(python_docs_text(120), encoding="utf-8")
    n = len(load_tokenizer(tiny_artifact).encode(python_docs_text(120)))
    assert 32 <= n < 2 * CTX
    cases = [
        (dict(text_file=tmp_path / "missing.txt"), "text file", "not found"),
        (dict(ctx=512), "--ctx 512 exceeds the artifact's context (256); give --ctx 256 or less"),
        (dict(ctx=63), "--ctx must be an even number >= 16"),
        (dict(ctx=8), "--ctx must be an even number >= 16"),
        (dict(ctx=CTX, stride=0), "--stride must be 1 .. --ctx (64)"),
        (dict(ctx=CTX, chunks=0), "--chunks must be a whole number >= 1"),
        (dict(ctx=CTX, save_logits=tmp_path / "nodir" / "x.npz"), "directory", "does not exist"),
        (dict(ctx=CTX, save_logits=tmp_path), "is a directory"),
    ]
    for kw, *fragments in cases:
        kw = {"text_file": text_file, **kw}
        with pytest.raises(LlamaExportError) as e:
            evaluate(tiny_artifact, kw.pop("text_file"), progress=False, **kw)
        for f in fragments:
            assert f in str(e.value), (kw, str(e.value))
    with pytest.raises(LlamaExportError) as e:
        evaluate(tiny_artifact, short, ctx=CTX, progress=False)
    fit = n // 2 - n // 2 % 2
    assert str(e.value) == f"the text is {n} tokens; perplexity with --ctx 64 needs at least 128: give --ctx {fit} or less, " \
                           "or a longer text"
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".*.tmp"))


def test_a_base_from_another_text_tokenizer_or_window_is_refused(tiny_artifact, text_file, base_file, tmp_path):
    path, _ = base_file
    other = tmp_path / "other.txt"
    other.write_text(python_docs_text(3000)[::-1], encoding="utf-8")
    with pytest.raises(LlamaExportError, match="computed on another text"):
        evaluate(tiny_artifact, other, base_logits=path, progress=False)
    with pytest.raises(LlamaExportError, match="computed with --ctx 64 --stride None, this run --ctx 32 --stride None"):
        evaluate(tiny_artifact, text_file, base_logits=path, ctx=32, progress=False)
    chunks = load_base(path)["meta"]["n_chunks"]
    with pytest.raises(LlamaExportError, match=f"cover {chunks} chunks, this run 3; give --chunks {chunks}"):
        evaluate(tiny_artifact, text_file, base_logits=path, chunks=3, progress=False)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(LlamaExportError, match="cannot read base logits .*garbage.npz"):
        evaluate(tiny_artifact, text_file, base_logits=garbage, progress=False)
    array = tmp_path / "array.npy"  # np.load gives a bare array, not an archive
    np.save(array, np.zeros(3))
    with pytest.raises(LlamaExportError, match="cannot read base logits .*array.npy"):
        evaluate(tiny_artifact, text_file, base_logits=array, progress=False)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, meta=np.array(json.dumps({"format": "something else"})), tokens=np.zeros(3), target=np.zeros(3),
             target_lp=np.zeros(3), ids=np.zeros((3, 2)), lp=np.zeros((3, 2)), rest=np.zeros(3))
    with pytest.raises(LlamaExportError, match="is not a llamaexport-eval-logits/1 file"):
        evaluate(tiny_artifact, text_file, base_logits=foreign, progress=False)


def test_a_base_from_another_tokenizer_is_refused(tiny_artifact, text_file, base_file, tmp_path):
    from llamaexport.build.pipeline import build

    spm = train_tiny_spm(tmp_path, vocab_size=350)
    art = build(out=tmp_path / "art", size="tiny", seed=7, tokenizer=str(spm), progress=False)
    with pytest.raises(LlamaExportError, match="come from another tokenizer"):
        evaluate(art, text_file, base_logits=base_file[0], progress=False)


def test_cli_json_and_errors(tiny_artifact, text_file, base_file):
    r = cli("eval", tiny_artifact, "--text", text_file, "--base-logits", base_file[0], "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert {"ppl", "ppl_se", "n_chunks", "ctx", "tokens", "tokens_per_s", "scored_tokens_per_s", "artifact",
            "precision", "backend", "base"} <= set(rep)
    assert rep["ppl"] == pytest.approx(base_file[1]["ppl"], rel=1e-12) and rep["precision"] == "fp32"
    assert {"mean_kl", "p99_kl", "top1_agreement", "ppl_delta", "ppl_ratio"} <= set(rep["base"])
    assert "eval" in r.stderr  # the progress bar, on stderr
    text = cli("eval", tiny_artifact, "--text", text_file, "--ctx", CTX, "--chunks", 2)
    assert text.returncode == 0 and "perplexity" in text.stdout and "2 chunks" in text.stdout, text.stderr
    assert_clean_error(cli("eval", tiny_artifact, "--text", "/nonexistent.txt"), "text file /nonexistent.txt not found")
    assert_clean_error(cli("eval", tiny_artifact, "--text", text_file, "--ctx", 1000), "exceeds the artifact's context")


def test_eval_does_not_import_torch(tiny_artifact, text_file):
    code = ("import sys; from llamaexport.verify.eval import evaluate; "
            "r = evaluate(sys.argv[1], sys.argv[2], ctx=64, chunks=2, progress=False); print(r['ppl']); "
            "bad = [n for n in ('torch', 'onnx', 'tensorrt') if n in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_artifact), str(text_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- the real model against llama.cpp

def test_smollm2_fp32_perplexity_matches_llamacpp(smol_build, smollm2_gguf, tmp_path):
    """Same GGUF, same text, same windows (scripts/llamacpp_ppl.py renders perplexity.cpp's own loop).
    llama.cpp runs the Q4_1 GGUF with its activations rounded to 8 bits for the dot products, our fp32
    artifact the dequantized weights in float32: the figures agree to a fraction of a percent."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python; "
                                            "it compiles llama.cpp)")
    from llamacpp_ppl import llamacpp_perplexity

    text = tmp_path / "python-docs.txt"
    text.write_text(python_docs_text(), encoding="utf-8")
    ours = evaluate(smol_build(precision="fp32"), text, ctx=512, chunks=4, progress=False)
    theirs = llamacpp_perplexity(smollm2_gguf, text, ctx=512, chunks=4)
    assert ours["tokens_sha256"] == theirs["tokens_sha256"] and ours["tokens"] == theirs["tokens"]
    assert ours["tokens_scored"] == theirs["tokens_scored"] == 4 * 255
    assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=0.005)
