#!/usr/bin/env python
"""Speculative decoding benchmark: our prompt lookup and draft artifact against plain decoding, beside
llama-cpp-python's LlamaPromptLookupDecoding on the same weights, over scripts/data/spec_prompts.json.

    python scripts/bench_spec.py [--precisions fp32,int8] [--new-tokens 192] [--threads 2] [--rounds 2]
                                 [--systems ours,llamacpp] [--draft] [--batch-study] [--workdir DIR] [--json OUT]

Prompts: the 20 grounded prompts (summarise / answer from / rewrite a given text, written for the project) and
the 10 open-ended ones, each one user turn in SmolLM2's chat template (our tokenizer's ids, given to both
systems), greedy, at most --new-tokens new tokens, stopping at EOS (so both modes generate the same tokens).
Weights: SmolLM2-135M-Instruct's GGUF dequantized; ours `llamaexport build --precision P` (bench_serve's build),
llama.cpp's own requantization of the same GGUF (F32 for fp32, Q8_0 for int8; bench_peers.ensure_gguf).
Modes (one process per system and precision, all modes of it in turns; --rounds rounds, the order rotating;
a figure is the median over rounds):
  ours plain      LlamaModel.steps, one token per forward
  ours ngram      steps(speculative=Speculation("ngram")): the defaults (k 4, n-grams 3 down to 1)
  llamacpp plain  Llama.generate(temp=0, repeat_penalty=1), no draft (llama.cpp's own default sampler chain
                  reduced to greedy)
  llamacpp lookup the same with draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10) (its defaults: n-gram
                  2, which also sets logits_all)
Figures per (system, mode, prompt kind): decode tok/s = generated tokens after the first / time from the first
token to the last, summed over the kind's prompts; x plain = its ratio to the same system's plain decoding;
"same text" = prompts whose tokens equal the system's plain tokens. Ours also reports acceptance (accepted /
drafted) and tokens per forward. --draft adds: SmolLM2 int4 (compact recipe) drafting for fp32, k = 2 and 4, per
prompt (acceptance, speedup), and the break-even acceptance where a least-squares line of speedup over
acceptance crosses 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "data" / "spec_prompts.json"


def log(msg):
    print(f"[bench-spec {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompt_set() -> list[dict]:
    d = json.loads(PROMPTS.read_text())
    return [{**p, "group": "grounded"} for p in d["grounded"]] + [{**p, "group": "open"} for p in d["open"]]


# ---- ours: in this process ---------------------------------------------------------------------------------

def ours_runs(artifact: Path, prompts: list[dict], a, modes: dict) -> dict:
    """{mode: [[per-prompt result] per round]} for our artifact; modes: {name: Speculation | None}."""
    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.runtime.speculative import SpecStats

    model = LlamaModel.load(artifact, threads=a.threads)
    ids = [model.encode(model.format_prompt(p["prompt"], chat=True)) for p in prompts]
    for spec in modes.values():  # warm-up, and a draft loaded once
        list(model.steps([ids[0]], max_new_tokens=8, speculative=spec))
    out = {m: [] for m in modes}
    names = list(modes)
    for r in range(a.rounds):
        for mode in names[r % len(names):] + names[:r % len(names)]:
            rows = []
            for p, x in zip(prompts, ids):
                stats = SpecStats()
                t0 = time.perf_counter()
                t1, toks = None, []
                for t in model.steps([x], max_new_tokens=a.new_tokens, speculative=modes[mode], spec_stats=stats):
                    t1 = t1 or time.perf_counter()
                    toks.append(int(t[0]))
                t2 = time.perf_counter()
                rows.append(dict(id=p["id"], group=p["group"], tokens=toks, decode_s=t2 - t1, ttft_s=t1 - t0,
                                 spec=stats.as_dict() if modes[mode] else None))
            out[mode].append(rows)
            log(f"ours {artifact.name} {mode} round {r + 1}: {summary_line(rows)}")
    model.close()
    return out


def summary_line(rows) -> str:
    n = sum(len(r["tokens"]) - 1 for r in rows)
    return f"{n} decode tokens, {n / sum(r['decode_s'] for r in rows):.1f} tok/s"


# ---- llama.cpp: llama-cpp-python in its own venv (worker mode of this script) --------------------------------

def llamacpp_worker(args: dict):
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    out = {}
    for mode in args["modes"]:
        draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if mode == "lookup" else None
        # logits_all with a draft: llama-cpp-python sizes its scores buffer from this argument (n_batch rows
        # without it), while a draft turns logits_all on inside; a prompt + drafts past n_batch then overflows it
        llm = Llama(args["gguf"], n_ctx=2048, n_threads=args["threads"], n_threads_batch=args["threads"], n_batch=512,
                    verbose=False, draft_model=draft, logits_all=draft is not None)
        eog = {llm.token_eos()} | set(args["eos"])
        list(zip(range(4), llm.generate(args["ids"][0], temp=0.0, repeat_penalty=1.0)))  # warm-up
        out[mode] = []
        for _ in range(args["rounds"]):
            rows = []
            for x in args["ids"]:
                llm.reset()
                t0 = time.perf_counter()
                t1, toks = None, []
                for t in llm.generate(x, temp=0.0, repeat_penalty=1.0, top_k=1, reset=True):
                    t1 = t1 or time.perf_counter()
                    toks.append(int(t))
                    if t in eog or len(toks) == args["new_tokens"]:
                        break
                t2 = time.perf_counter()
                rows.append(dict(tokens=toks, decode_s=t2 - t1, ttft_s=t1 - t0))
            out[mode].append(rows)
        llm.close()
    return out


def llamacpp_runs(gguf: Path, py: str, prompts, ids, eos, a, wd: Path) -> dict:
    args = dict(gguf=str(gguf), ids=ids, eos=list(eos), threads=a.threads, rounds=a.rounds, new_tokens=a.new_tokens,
                modes=["plain", "lookup"])
    spec = wd / "spec-llamacpp-args.json"
    spec.write_text(json.dumps(args))
    res = subprocess.run([py, str(Path(__file__).resolve()), "--worker", str(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    raw = json.loads(res.stdout.strip().splitlines()[-1])
    for mode, rounds in raw.items():
        for r, rows in enumerate(rounds):
            for p, row in zip(prompts, rows):
                row.update(id=p["id"], group=p["group"], spec=None)
            log(f"llamacpp {gguf.name} {mode} round {r + 1}: {summary_line(rows)}")
    return raw


# ---- figures -----------------------------------------------------------------------------------------------

def figures(system: str, label: str, runs: dict, base_mode: str) -> list[dict]:
    """One row per (mode, group): decode tok/s (median over rounds), x plain, same text, acceptance."""
    rows = []
    plain_tokens = {r["id"]: r["tokens"] for r in runs[base_mode][0]}
    for mode, rounds in runs.items():
        for group in ("grounded", "open"):
            speeds, acc, tpf = [], [], []
            for rr in rounds:
                sel = [r for r in rr if r["group"] == group]
                n = sum(len(r["tokens"]) - 1 for r in sel)
                speeds.append(n / sum(r["decode_s"] for r in sel))
                if sel[0]["spec"]:
                    drafted = sum(r["spec"]["drafted"] for r in sel)
                    acc.append(sum(r["spec"]["accepted"] for r in sel) / max(drafted, 1))
                    tpf.append(sum(r["spec"]["tokens"] for r in sel) / sum(r["spec"]["forwards"] for r in sel))
            sel = [r for r in rounds[0] if r["group"] == group]
            rows.append(dict(system=system, weights=label, mode=mode, group=group, prompts=len(sel),
                             decode_tok_s=statistics.median(speeds), rounds=speeds,
                             tokens=sum(len(r["tokens"]) for r in sel),
                             same_text=sum(r["tokens"] == plain_tokens[r["id"]] for r in sel),
                             acceptance=statistics.median(acc) if acc else None,
                             tokens_per_forward=statistics.median(tpf) if tpf else None))
    for r in rows:
        base = next(b for b in rows if b["mode"] == base_mode and b["group"] == r["group"])
        r["x_plain"] = r["decode_tok_s"] / base["decode_tok_s"]
    return rows


def table(rows) -> str:
    head = ["system", "weights", "mode", "prompts", "decode tok/s", "x plain", "same text", "acceptance",
            "tokens/forward", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = f"{r['acceptance']:.1%}" if r["acceptance"] is not None else ""
        tpf = f"{r['tokens_per_forward']:.2f}" if r["tokens_per_forward"] is not None else ""
        lines.append(f"| {r['system']} | {r['weights']} | {r['mode']} | {r['group']} {r['prompts']} | "
                     f"{r['decode_tok_s']:.1f} | {r['x_plain']:.2f} | {r['same_text']}/{r['prompts']} | {acc} | {tpf} | "
                     f"{r['tokens']} |")
    return "\n".join(lines)


def draft_study(target: Path, draft: Path, prompts, a) -> dict:
    """Per prompt: acceptance and speedup of the draft at k = 2 and 4 (one round each, plain first), the draft's
    own plain decode speed, and the break-even acceptance."""
    import numpy as np

    from llamaexport.runtime.speculative import Speculation

    res = ours_runs(target, prompts, a, {"plain": None, "draft k2": Speculation("draft", k=2, draft=str(draft)),
                                          "draft k4": Speculation("draft", k=4, draft=str(draft))})
    alone = ours_runs(draft, prompts[:5], argparse.Namespace(**{**vars(a), "rounds": 1}), {"plain": None})
    plain = {r["id"]: r for r in res["plain"][0]}
    out = {"draft_alone_tok_s": sum(len(r["tokens"]) - 1 for r in alone["plain"][0]) /
           sum(r["decode_s"] for r in alone["plain"][0])}
    for mode in ("draft k2", "draft k4"):
        pts = []
        for r in res[mode][0]:
            base = plain[r["id"]]
            speed = (len(r["tokens"]) - 1) / r["decode_s"] / ((len(base["tokens"]) - 1) / base["decode_s"])
            pts.append(dict(id=r["id"], group=r["group"], acceptance=r["spec"]["acceptance"], speedup=speed,
                            same=r["tokens"] == base["tokens"]))
        x = np.array([p["acceptance"] for p in pts])
        y = np.array([p["speedup"] for p in pts])
        slope, icept = np.polyfit(x, y, 1) if len(set(x)) > 1 else (0.0, float(y.mean()))
        out[mode] = dict(points=pts, break_even_acceptance=(1 - icept) / slope if slope else None,
                         grounded_speedup=statistics.median(p["speedup"] for p in pts if p["group"] == "grounded"),
                         open_speedup=statistics.median(p["speedup"] for p in pts if p["group"] == "open"),
                         same_text=sum(p["same"] for p in pts))
    return out


def batch_study(artifact: Path, a, k: int = 8) -> dict:
    """Under a batch of two decoding streams: one batched decode forward (2 tokens) against verifying each row
    alone (a forward of k + 1 tokens per row: GroupQueryAttention takes several new tokens over a past only at
    batch 1). Two rows verified one by one give 2 * E tokens (E: tokens per forward) in two_verify seconds, the
    batched decode 2 tokens in decode_b2 seconds: speculating under a batch pays when E > two_verify / decode_b2,
    the break-even tokens per forward reported."""
    import numpy as np

    from llamaexport.runtime.llama_model import LlamaModel
    from llamaexport.runtime.slots import make_slots

    model = LlamaModel.load(artifact, threads=a.threads)
    slots = make_slots(model.backend, 2)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 20000, 300).tolist()
    for s in (0, 1):
        slots.prefill(s, prompt)
    base = slots.length[0]

    def timed(fn, n=20):
        ts = []
        for _ in range(n):
            for s in (0, 1):
                slots.truncate(s, base)
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    decode = timed(lambda: slots.decode([0, 1], [5, 6]))
    alone1 = timed(lambda: [slots.prefill(s, [5]) for s in (0, 1)])
    verify = timed(lambda: [slots.prefill(s, [5] * (k + 1), all_logits=True) for s in (0, 1)])
    model.close()
    # two rows speculated one by one give 2 * E tokens in `verify` seconds; batched decode 2 tokens in `decode`
    return dict(decode_b2_ms=decode * 1e3, two_single_ms=alone1 * 1e3, two_verify_ms=verify * 1e3, k=k,
                break_even_tokens_per_forward=verify / decode)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--systems", default="ours,llamacpp")
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--draft", action="store_true", help="Also the int4-compact draft for fp32 (k 2 and 4).")
    ap.add_argument("--sweep", action="store_true",
                    help="Only: prompt lookup's k (4, 8, 16) x shortest n-gram (1, 2) on the first precision, ours.")
    ap.add_argument("--batch-study", action="store_true",
                    help="Also: batched decode of 2 rows against verifying each alone (per precision).")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/llamaexport-bench"))
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(llamacpp_worker(json.loads(Path(a.worker).read_text()))))
        return
    sys.path.insert(0, str(HERE))
    import bench_peers as bp
    import bench_serve as bs

    from llamaexport.runtime.speculative import Speculation

    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    prompts = prompt_set()
    rows, extra = [], {}
    if a.sweep:
        modes = {"plain": None, **{f"ngram k{k} n3..{n}": Speculation("ngram", k=k, ngram_min=n)
                                   for k in (4, 8, 16) for n in (1, 2)}}
        art = bs.prepare_ours("smollm2", a.precisions.split(",")[0], wd)
        rows += figures("ours", a.precisions.split(",")[0], ours_runs(art, prompts, a, modes), "plain")
        print(table(rows))
        return
    for precision in a.precisions.split(","):
        art = bs.prepare_ours("smollm2", precision, wd)
        if "ours" in a.systems:
            runs = ours_runs(art, prompts, a, {"plain": None, "ngram": Speculation("ngram")})
            rows += figures("ours", precision, runs, "plain")
        if "llamacpp" in a.systems:
            from llamaexport.model.tokenizer import load_tokenizer
            from llamaexport.runtime.llama_model import LlamaModel

            with LlamaModel.load(art) as m:
                ids = [m.encode(m.format_prompt(p["prompt"], chat=True)) for p in prompts]
            py = bs.ensure_llamacpp_server(wd)
            gguf = bp.ensure_gguf("smollm2", bp.GGUF_TYPES[precision], py, wd)
            runs = llamacpp_runs(gguf, py, prompts, ids, load_tokenizer(art).eos_ids, a, wd)
            rows += figures("llama.cpp", bp.GGUF_TYPES[precision], runs, "plain")
    if a.batch_study:
        extra["batch"] = {p: batch_study(bs.prepare_ours("smollm2", p, wd), a) for p in a.precisions.split(",")}
    if a.draft:
        target = bs.prepare_ours("smollm2", "fp32", wd)
        draft = wd / "spec-draft-smollm2-int4-compact"
        if not (draft / "manifest.json").exists():
            bp.sh([sys.executable, "-m", "llamaexport.cli", "build", "--checkpoint", str(bp.smollm2_gguf()),
                   "--precision", "int4", "--int4-recipe", "compact", "--out", str(draft), "--force"],
                  wd / "logs" / "spec-draft-build.log", "llamaexport build (draft)")
        extra["draft"] = draft_study(target, draft, prompts, a)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} CPUs, --threads {a.threads}, greedy, at most {a.new_tokens} new tokens, "
          f"{a.rounds} rounds\n")
    print(table(rows))
    if "draft" in extra:
        d = extra["draft"]
        print(f"\ndraft SmolLM2 int4 compact for fp32: the draft alone decodes {d['draft_alone_tok_s']:.1f} tok/s")
        for mode in ("draft k2", "draft k4"):
            m = d[mode]
            be = f"{m['break_even_acceptance']:.1%}" if m["break_even_acceptance"] is not None else "n/a"
            print(f"  {mode}: median speedup grounded {m['grounded_speedup']:.2f}x, open {m['open_speedup']:.2f}x, "
                  f"same text {m['same_text']}/{len(m['points'])}, break-even acceptance {be}")
    for p, b in extra.get("batch", {}).items():
        print(f"\nunder a batch ({p}): batched decode of 2 rows {b['decode_b2_ms']:.1f} ms, the 2 rows alone "
              f"{b['two_single_ms']:.1f} ms, each verifying {b['k'] + 1} tokens alone {b['two_verify_ms']:.1f} ms: "
              f"speculating them one by one pays above {b['break_even_tokens_per_forward']:.2f} tokens per forward")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, **extra}, indent=1))


if __name__ == "__main__":
    main()
