"""`llamaexport bench`: prefill and decode throughput of an artifact, and peak memory.

Prefill is one forward over a `prompt_len`-token prompt; decode is `new_tokens` single-token
forwards through the KV cache with greedy selection, timed separately. The median of `repeat`
runs is reported (after one warm-up), as tokens per second over the whole batch.

Memory: peak RSS is checked against a budget of weights + KV cache + 300 MB (the interpreter,
numpy, ONNX Runtime and its arenas). weights_mb is the weight data on disk (model.onnx +
model.onnx.data). kv_cache_mb is the cache this run makes the runtime allocate:
2 (K and V) x layers x kv_heads x head_dim x length x batch x dtype bytes, where length is
max_seq_len when the manifest's kv_cache form is KVForm.INPLACE (the runtime binds one
max-length buffer per tensor, written in place) and prompt_len + new_tokens otherwise (the cache
grows by one position per token).
"""

from __future__ import annotations

import resource
import socket
import statistics
import time
from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError, whole_number
from llamaexport.model.kv_form import KVForm
from llamaexport.runtime.hugepages import huge_pages_mb


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory in MB (MiB): this process's (getrusage; Linux reports KiB), or process `pid`'s
    (VmHWM of /proc/PID/status; NaN where there is none), e.g. a server that a benchmark started."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return _proc_status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    """Process `pid`'s resident memory now, in MB (MiB): VmRSS of /proc/PID/status (NaN where there is none)."""
    return _proc_status_mb(pid, "VmRSS")


def _proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a server that a test or benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RSS_OVERHEAD_MB = 300  # interpreter + numpy + onnxruntime + arenas, on top of weights and KV cache
MB = 2**20  # as peak_rss_mb: ru_maxrss is in KiB


def weights_bytes(artifact, manifest: dict) -> int:
    """Bytes of the artifact's weight data on disk: model.onnx + model.onnx.data (whichever exist)."""
    files = manifest.get("files") or {}
    paths = [Path(artifact) / files[k] for k in ("onnx", "onnx_data") if files.get(k)]
    return sum(p.stat().st_size for p in paths if p.is_file())


def kv_cache_bytes(manifest: dict, *, batch: int, prompt_len: int, new_tokens: int) -> int:
    """The KV cache the runtime allocates for a bench run (see the module docstring)."""
    from llamaexport.model.config import LlamaConfig

    cfg = LlamaConfig.from_dict(manifest["model"])
    length = cfg.max_seq_len if KVForm.of(manifest) is KVForm.INPLACE else prompt_len + new_tokens
    itemsize = np.dtype(manifest["kv_cache"].get("dtype", "float32")).itemsize
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * length * batch * itemsize


def memory_budget(artifact, manifest: dict, *, batch: int, prompt_len: int, new_tokens: int,
                  peak_mb: float) -> dict:
    w = weights_bytes(artifact, manifest) / MB
    kv = kv_cache_bytes(manifest, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens) / MB
    budget = w + kv + RSS_OVERHEAD_MB
    return {"weights_mb": round(w, 3), "kv_cache_mb": round(kv, 3), "rss_budget_mb": round(budget, 3),
            "rss_within_budget": bool(peak_mb <= budget)}


def load_for_bench(artifact, *, prompt_len: int, new_tokens: int, batch: int = 1, threads: int | None = None,
                   backend: str | None = None, prompt_file=None, speculative=None, stats=None):
    """(model, once): the loaded artifact and a function that runs one timed generation and returns
    (prefill tok/s, decode tok/s). scripts/bench_peers.py interleaves calls of `once` with other systems'.
    prompt_file: a text sent as one chat turn (as it is without a chat format; its length replaces prompt_len); speculative: a
    runtime.speculative.Speculation (batch 1), whose forwards and accepted drafts `stats` (a SpecStats) counts."""
    from llamaexport.runtime.llama_model import LlamaModel

    for name, v in (("--prompt-len", prompt_len), ("--new-tokens", new_tokens), ("--batch", batch)):
        whole_number(v, name)
    if speculative is not None and batch != 1:
        raise LlamaExportError("speculative decoding runs one stream: use --batch 1")
    model = LlamaModel.load(artifact, threads=threads, backend=backend)
    cfg = model.config
    if speculative is not None and speculative.method == "draft":
        from llamaexport.runtime.speculative import load_draft
        speculative.draft = load_draft(speculative.draft, model)
    if prompt_file is not None:
        text = Path(prompt_file).read_text(encoding="utf-8")
        try:
            text = model.format_prompt(text, chat=True)
        except LlamaExportError:  # no chat format (a base model): the text as it is
            pass
        prompts = [model.encode(text)] * batch
        prompt_len = len(prompts[0])
    else:
        prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len)).tolist()
    if prompt_len + new_tokens >= cfg.max_seq_len:
        raise LlamaExportError(f"prompt {prompt_len} + new tokens {new_tokens} must stay below the context "
                               f"{cfg.max_seq_len}; lower --prompt-len or --new-tokens")

    def once():
        # the generation loop users run (LlamaModel.steps, greedy), EOS ignored: the first token comes
        # after the prompt's forward, each of the next new_tokens after one single-token forward (or, with
        # speculation, several per verify forward)
        t0 = time.perf_counter()
        t1, n = None, 0
        for _ in model.steps(prompts, max_new_tokens=new_tokens + 1, eos_ids=[], speculative=speculative,
                             spec_stats=stats):
            t1, n = t1 or time.perf_counter(), n + 1
        t2 = time.perf_counter()
        return batch * prompt_len / (t1 - t0), batch * (n - 1) / (t2 - t1)

    once.prompt_len = prompt_len
    return model, once


def run_bench(artifact, *, prompt_len: int = 64, new_tokens: int = 128, batch: int = 1,
              threads: int | None = None, repeat: int = 3, backend: str | None = None, prompt_file=None,
              speculative=None) -> dict:
    from llamaexport.runtime.speculative import SpecStats

    whole_number(repeat, "--repeat")
    stats = SpecStats()
    model, once = load_for_bench(artifact, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch,
                                 threads=threads, backend=backend, prompt_file=prompt_file, speculative=speculative,
                                 stats=stats)
    once()  # warm-up: first-run allocations and kernel selection
    stats.__init__()  # the timed runs' only
    runs = [once() for _ in range(repeat)]
    prompt_len = once.prompt_len  # a prompt file's own
    peak = peak_rss_mb()
    return {
        "artifact": str(artifact),
        "backend": backend or model.manifest.get("backend"),
        "precision": model.manifest.get("precision"),
        "prefill_tok_s": round(statistics.median(r[0] for r in runs), 2),
        "decode_tok_s": round(statistics.median(r[1] for r in runs), 2),
        "peak_rss_mb": round(peak, 1),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch": batch,
        "threads": getattr(model.backend, "threads", None),
        "repeat": repeat,
        **({"speculative": speculative.method, "spec_k": speculative.k, **stats.as_dict()} if speculative else {}),
        "huge_pages_mb": huge_pages_mb(),   # memory in transparent huge pages (see hugepages.py)
        # TensorRT: the engine's activation memory, per execution context (the KV cache and weights apart)
        **({"device_memory_mb": round(model.backend.device_memory_bytes / MB, 1)}
           if hasattr(model.backend, "device_memory_bytes") else {}),
        **memory_budget(artifact, model.manifest, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                        peak_mb=peak),
    }


def format_bench(r: dict) -> str:
    return (f"{r['artifact']} ({r['backend']}, {r['precision']}, batch {r['batch']}, {r['threads']} threads)\n"
            f"  prefill  {r['prefill_tok_s']:10.1f} tok/s   ({r['prompt_len']}-token prompt)\n"
            f"  decode   {r['decode_tok_s']:10.1f} tok/s   ({r['new_tokens']} new tokens)\n"
            f"  peak RSS {r['peak_rss_mb']:10.1f} MB   (budget {r['rss_budget_mb']:.1f} MB = weights "
            f"{r['weights_mb']:.1f} + KV cache {r['kv_cache_mb']:.1f} + {RSS_OVERHEAD_MB}: "
            f"{'within' if r['rss_within_budget'] else 'OVER'})"
            + (f"\n  speculative {r['speculative']} (k {r['spec_k']}): acceptance {r['acceptance']:.1%}, "
               f"{r['tokens_per_forward']:.2f} tokens per forward" if r.get("speculative") else "")
            + (f"\n  huge pages {r['huge_pages_mb']:8.1f} MB" if r.get("huge_pages_mb") is not None else "")
            + (f"\n  engine device memory {r['device_memory_mb']:.1f} MB" if r.get("device_memory_mb") is not None else ""))
