"""The torch-free runtime: load an artifact, prefill, decode with the KV cache, sample, stream.

Every backend (ONNX Runtime here, TensorRT in tensorrt/backend.py, the PyTorch reference in model.py)
implements the `Backend` protocol, and `LlamaModel.steps` is the one decode loop over it that
`run`, the Python API, `bench` and `check` drive. The ONNX Runtime backend keeps the cache as
OrtValues bound through I/O binding: the present tensors of one step are bound as the past of
the next without a copy through numpy.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Callable, Iterator
from numbers import Integral
from pathlib import Path
from typing import Protocol

import numpy as np

from llamaexport import LlamaExportError, log
from llamaexport.artifact.manifest import read_manifest, require_intact
from llamaexport.model.config import LlamaConfig
from llamaexport.model.kv_form import KVForm, SpareCache
from llamaexport.runtime.completion import Completion, FinishReason, check_generation, eos_set
from llamaexport.runtime.sampling import Sampler, SamplingConfig, TokenLogprob, token_logprobs


class Backend(Protocol):
    """What the decode loop needs of a runtime (Polygraphy-style runner)."""

    threads: int | None    # CPU threads it runs with, None where that does not apply
    kv_form: KVForm        # how its cache grows: INPLACE (runtime.slots.InplaceSlots) or CONCAT (ConcatSlots)
    max_batch: int | None  # the most rows one forward takes (a TensorRT engine's profiles), None: no bound

    def empty_cache(self, batch: int):
        """A fresh, empty KV cache for `batch` rows."""

    def take_cache(self, batch: int):
        """A cache for a new generation; may recycle one given back (else = empty_cache)."""

    def give_back_cache(self, batch: int, cache) -> None:
        """A finished (or abandoned) generation's cache, for take_cache to recycle."""

    def forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        """input_ids, position_ids [B, S], attention_mask [B, past + S] -> (logits [B, S, V] float32
        numpy, cache). last_only: the caller needs the last position's logits only; a backend may
        then return [B, 1, V]."""

    def close(self) -> None:
        """Release what the backend holds (sessions, engines, device memory)."""


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_threads(threads) -> int | None:
    """None or 0: every CPU this process may use; else 1 .. that many (more threads than CPUs only
    thrash, and ONNX Runtime makes a thread pool of whatever it is given)."""
    if threads is None or threads == 0:
        return None
    cpus = default_threads()
    if isinstance(threads, bool) or not isinstance(threads, Integral) or not 1 <= threads <= cpus:
        raise LlamaExportError(f"threads {threads!r} is not possible here: give 1 to {cpus} (the CPUs this process "
                               "may use), or 0 / nothing for all of them")
    return int(threads)


def _lazy_zeros(shape, dtype) -> np.ndarray:
    """np.zeros whose pages become memory only when written, and go back to the OS when freed. A
    max-length KV buffer is mostly never touched; np.zeros gets that from glibc only while its
    mmap threshold is low: once a freed buffer has raised it, the next generation's buffers come
    from the heap, zeroed in full, and RSS grows with every generation."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n < 1 << 20:
        return np.zeros(shape, dtype)
    # private anonymous map: untouched pages read as the shared zero page, written ones are ours
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype).reshape(shape)


_warned_cuda = False


def providers_for(device: str, available) -> list[str]:
    """ONNX Runtime's execution providers for an artifact whose manifest says runtime.device (cpu or
    cuda; a profile's [runtime] device): CUDA first when asked for and this onnxruntime has it (the
    onnxruntime-gpu package), else the CPU, after one warning when CUDA was asked for."""
    global _warned_cuda
    if device == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if not _warned_cuda:
            log("warning: this artifact is for ONNX Runtime's CUDA provider, which this onnxruntime lacks "
                "(pip install onnxruntime-gpu); running on the CPU")
            _warned_cuda = True
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend(SpareCache):
    """Runs `model.onnx` with ONNX Runtime (a Backend): on the CPU, or on ONNX Runtime's CUDA provider
    (device "cuda"), where the KV cache stays on the GPU: presents are bound to device memory and
    bound back as the next step's past, and only the logits are copied to the host."""

    max_batch = None  # any batch

    def __init__(self, model_path: Path, cfg: LlamaConfig, io: dict, *, threads: int | None = None,
                 kv_form: KVForm = KVForm.CONCAT, device: str = "cpu"):
        """kv_form INPLACE: the graph's attention (GroupQueryAttention, or TensorScatter) updates a max-length
        KV buffer in place when the same buffer is bound as past and present: no cache copy per token."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors only: ORT warns that num_logits_to_keep is an overridable initializer
        providers = providers_for(device, ort.get_available_providers())
        try:
            self.sess = ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise LlamaExportError(f"ONNX Runtime cannot load {model_path}: {str(e).splitlines()[0][:200]}; "
                                   "rebuild the artifact") from None
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        self.cfg = cfg
        self.threads = so.intra_op_num_threads
        self.past_names = [n for n in io["inputs"] if n.startswith("past_key_values.")]
        self.present_names = [n for n in io["outputs"] if n.startswith("present.")]
        self.kv_dtype = np.dtype(io["inputs"][self.past_names[0]]["dtype"]) if self.past_names else np.float32
        self.kv_form = kv_form
        self.logits_dtype = np.dtype(io["outputs"]["logits"]["dtype"])
        self.keep_input = "num_logits_to_keep" in io["inputs"]
        # an overridable initializer: only an OrtValue binds it (bind_cpu_input looks among the inputs)
        self._one = ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64))
        self._all = ort.OrtValue.ortvalue_from_numpy(np.array(0, np.int64))  # 0 = logits of every position
        self._io = self._io_cache = None  # the binding of the shared cache in use (see _binding)
        self._bound = {}
        # (batch, cache) of a finished generation (SpareCache): its pages are already mapped (a fresh max-length
        # cache costs two maps per layer and a page fault per page written) and its IOBinding is kept unless
        # another cache was bound since; GroupQueryAttention reads only each row's seqlens_k + 1 positions
        self._spare = None
        self._ort = ort

    def _ortvalue(self, a: np.ndarray):
        """a as an OrtValue on this backend's device (the CPU: the array's own memory, no copy)."""
        if self.device == "cuda":
            return self._ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0)
        return self._ort.OrtValue.ortvalue_from_numpy(a)

    def empty_cache(self, batch: int):
        c = self.cfg
        if self.kv_form is KVForm.INPLACE:  # one max-length buffer per tensor, written in place
            self._io = self._io_cache = None  # a new generation: let the previous cache go
            shape = (batch, c.n_kv_heads, c.max_seq_len, c.head_dim)
            return [self._ortvalue(_lazy_zeros(shape, self.kv_dtype)) for _ in self.past_names]
        z = np.zeros((batch, c.n_kv_heads, 0, c.head_dim), self.kv_dtype)
        return [self._ort.OrtValue.ortvalue_from_numpy(z) for _ in self.past_names]  # empty: no device copy

    def slot_cache(self, n: int) -> dict:
        """InplaceSlots' buffers: one [n, kv_heads, ctx, head_dim] per cache tensor (host memory, or an
        OrtValue on the GPU), with the IOBinding of each row range made so far."""
        c = self.cfg
        shape = (n, c.n_kv_heads, c.max_seq_len, c.head_dim)
        bufs = [_lazy_zeros(shape, self.kv_dtype) for _ in self.past_names]
        if self.device == "cuda":
            bufs = [self._ortvalue(b) for b in bufs]
            ptrs = [b.data_ptr() for b in bufs]
        else:
            ptrs = [b.ctypes.data for b in bufs]
        row = int(np.prod(shape[1:])) * np.dtype(self.kv_dtype).itemsize
        return {"bufs": bufs, "ptrs": ptrs, "row_bytes": row, "bindings": {}}

    def run_slots(self, state: dict, lo: int, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, *,
                  all_logits: bool = False) -> np.ndarray:
        """One forward of rows lo .. lo + len(ids) of a slot_cache, each bound as both past and present
        (a view at its byte offset: no copy); returns the last position's logits [rows, V] float32 (all_logits:
        every position's, [rows, S, V])."""
        k = ids.shape[0]
        io = state["bindings"].get((lo, k))
        if io is None:
            c = self.cfg
            io = self.sess.io_binding()
            io.bind_output("logits")
            shape = [k, c.n_kv_heads, c.max_seq_len, c.head_dim]
            for past, present, ptr in zip(self.past_names, self.present_names, state["ptrs"]):
                at = ptr + lo * state["row_bytes"]
                io.bind_input(past, self.device, 0, self.kv_dtype, shape, at)
                io.bind_output(present, self.device, 0, self.kv_dtype, shape, at)
            if self.keep_input:
                io.bind_ortvalue_input("num_logits_to_keep", self._one)
            state["bindings"][(lo, k)] = io
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", pos)
        every = all_logits or not self.keep_input
        logits = np.empty((k, ids.shape[1] if every else 1, self.cfg.vocab_size), self.logits_dtype)
        io.bind_output("logits", "cpu", 0, self.logits_dtype, logits.shape, logits.ctypes.data)
        if all_logits and self.keep_input:
            io.bind_ortvalue_input("num_logits_to_keep", self._all)
        try:
            self.sess.run_with_iobinding(io)
        finally:
            if all_logits and self.keep_input:  # the binding is kept for the next (last-logits) forward
                io.bind_ortvalue_input("num_logits_to_keep", self._one)
        return (logits if all_logits else logits[:, -1]).astype(np.float32, copy=False)

    def copy_slot_prefix(self, state: dict, src: int, dst: int, n: int):
        """Row dst of every slot_cache buffer gets row src's first n positions ([kv_heads, n, head_dim] each)."""
        for buf in state["bufs"]:
            if isinstance(buf, np.ndarray):
                buf[dst, :, :n] = buf[src, :, :n]
            else:  # an OrtValue on the GPU: ORT's Python API copies whole tensors only, so through the host
                host = buf.numpy()
                host[dst, :, :n] = host[src, :, :n]
                buf.update_inplace(host)

    def join_rows(self, caches: list[list], length: int) -> list:
        """ConcatSlots' decode batch: per cache tensor, the slots' [1, K, n, hd] caches left-padded with zeros
        to `length` positions and stacked into one [rows, K, length, hd] host array."""
        def pad(x: np.ndarray) -> np.ndarray:
            n = x.shape[2]
            return x if n == length else np.concatenate([np.zeros(x.shape[:2] + (length - n,) + x.shape[3:], x.dtype), x],
                                                        axis=2)
        return [np.concatenate([pad(c[i]) for c in caches], axis=0) for i in range(len(caches[0]))]

    def split_rows(self, present: list, keep: list[int]) -> list[list]:
        """A forward's presents [rows, K, T, hd] as each row's own cache: row r's last keep[r] positions,
        [1, K, keep[r], hd] (views of host arrays: an OrtValue is read into one first)."""
        present = [p if isinstance(p, np.ndarray) else p.numpy() for p in present]
        return [[p[r:r + 1, :, p.shape[2] - k:] for p in present] for r, k in enumerate(keep)]

    def close(self):
        self._io = self._io_cache = self._spare = None
        self._bound = {}
        self.sess = None

    def _binding(self, cache):
        """An IOBinding with the cache bound. A shared cache is bound once per generation (its buffers never
        change), so a decode step only rebinds its three small inputs and the logits."""
        in_place = self.kv_form is KVForm.INPLACE
        if in_place and self._io_cache is cache:
            return self._io
        self._bound = {}  # name -> the array or OrtValue bound to it in this binding (see _bind)
        io = self.sess.io_binding()
        io.bind_output("logits")  # first: get_outputs() lists outputs in the order they were first bound
        for name, v in zip(self.past_names, cache):
            if isinstance(v, np.ndarray):  # a cache ConcatSlots assembled (join_rows)
                v = np.ascontiguousarray(v)
                io.bind_cpu_input(name, v)
                self._bound[name] = (v, None)  # kept alive until the next binding
            else:
                io.bind_ortvalue_input(name, v)
        if in_place:
            for name, v in zip(self.present_names, cache):
                io.bind_ortvalue_output(name, v)
            self._io, self._io_cache = io, cache
        else:
            for name in self.present_names:
                io.bind_output(name, self.device)  # on the GPU the next step binds it as its past, no copy
        return io

    def _bind(self, io, name: str, value):
        """Bind an input unless this very object (same shape) is bound already. On the CPU provider a
        binding points at the array's memory, so a caller that updates its arrays in place between
        steps (steps() does, for input_ids and position_ids) costs no rebinding; the CUDA provider
        copies at binding, so there every step rebinds. _bound also keeps the arrays alive."""
        shape = value.shape if isinstance(value, np.ndarray) else None
        prev = self._bound.get(name)
        # the CUDA provider copies a host array to the device when it is bound: rebind every step there
        if prev is not None and prev[0] is value and prev[1] == shape and self.device == "cpu":
            return
        if shape is not None:
            io.bind_cpu_input(name, value)
        else:
            io.bind_ortvalue_input(name, value)
        self._bound[name] = (value, shape)

    def forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        # bind_cpu_input points at the array's memory: these locals keep any converted copy alive
        # until the run is over
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        position_ids = np.ascontiguousarray(position_ids, dtype=np.int64)
        io = self._binding(cache)
        last_only = last_only and self.keep_input
        if self.keep_input:
            self._bind(io, "num_logits_to_keep", self._one if last_only else self._all)
        self._bind(io, "input_ids", input_ids)
        self._bind(io, "attention_mask", attention_mask)
        self._bind(io, "position_ids", position_ids)
        if self.kv_form is KVForm.INPLACE:
            # The logits go straight into a fresh array: get_outputs() would wrap every present buffer
            # too (two OrtValues per layer per step), and a fresh array stays valid after the next step.
            B, S = input_ids.shape
            logits = np.empty((B, 1 if last_only else S, self.cfg.vocab_size), self.logits_dtype)
            io.bind_output("logits", "cpu", 0, self.logits_dtype, logits.shape, logits.ctypes.data)
            self.sess.run_with_iobinding(io)
            return logits, cache
        self.sess.run_with_iobinding(io)
        outs = io.get_outputs()
        return outs[0].numpy(), outs[1:]


@dataclasses.dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason  # eos | stop | length (runtime.completion)
    # generate(logprobs=k): each token of the text's, from the raw logits, with its k most likely alternatives
    # (an EOS id, or tokens a stop string cut away, are not reported; sampling.TokenLogprob)
    logprobs: list[TokenLogprob] | None = None
    # generate(speculative=...): runtime.speculative.SpecStats of the generation (forwards, drafted, accepted)
    speculation: object = None


class LlamaModel:
    """A built artifact, ready to generate. `LlamaModel.load(dir)`; torch is never imported."""

    def __init__(self, artifact_dir, manifest: dict, backend, tokenizer):
        self.dir = Path(artifact_dir)
        self.manifest = manifest
        self.config = LlamaConfig.from_dict(manifest["model"])
        self.backend = backend
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, artifact_dir, *, threads: int | None = None, backend: str | None = None) -> "LlamaModel":
        """backend: None = the manifest's; "onnxruntime" also runs the ONNX graph of a TensorRT
        artifact (e.g. to check an --export-only build before compiling it on the target).
        threads: CPU threads (None: the profile's, recorded at build; 0 there = all available)."""
        d = Path(artifact_dir)
        m = read_manifest(d)
        require_intact(d, m, hashes=False)  # sizes on every load; `verify` and `check` compare the hashes
        cfg = LlamaConfig.from_dict(m["model"])
        backend_name = backend or m.get("backend", "onnxruntime")
        if threads is None:  # the profile's, recorded at build, on whatever machine runs it now
            recorded = (m.get("runtime") or {}).get("threads") or 0
            threads = min(recorded, default_threads()) if isinstance(recorded, int) and recorded > 0 else None
        else:
            threads = check_threads(threads)
        if backend_name == "onnxruntime":
            backend = OnnxRuntimeBackend(d / m["files"]["onnx"], cfg, m["io"], threads=threads,
                                         kv_form=KVForm.of(m),
                                         device=(m.get("runtime") or {}).get("device", "cpu"))
        elif backend_name == "tensorrt":
            from llamaexport.tensorrt.backend import TensorRTBackend  # lazy: tensorrt is optional
            backend = TensorRTBackend(d, m, cfg)
        else:
            raise LlamaExportError(f"{d}: unknown backend {backend_name!r} in manifest; rebuild the artifact")
        tok = None
        if m.get("tokenizer"):
            from llamaexport.model.tokenizer import load_tokenizer
            tok = load_tokenizer(d)
        return cls(d, m, backend, tok)

    def close(self):
        """Release the backend (its session or engine and KV buffers)."""
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ prompts
    def require_tokenizer(self):
        if self.tokenizer is None:
            raise LlamaExportError(
                f"{self.dir} has no tokenizer (built from random weights?); rebuild with --tokenizer PATH")
        return self.tokenizer

    @property
    def chat_format(self) -> str:
        """The chat format recorded at build (`build --chat-format`), else "auto" (the tokenizer's template)."""
        return self.manifest.get("chat_format") or "auto"

    def format_prompt(self, prompt: str, *, chat: bool | str = False, system: str | None = None) -> str:
        """chat: False = the prompt as it is; True = a chat turn in `chat_format`; a name = in that format."""
        if not chat:
            return prompt
        from llamaexport.model.chat import format_chat

        fmt = chat if isinstance(chat, str) else self.chat_format
        return format_chat([{"role": "user", "content": prompt}], tokenizer=self.require_tokenizer(),
                           fmt=fmt, system=system)

    def constraint(self, spec):
        """A fresh runtime.constraint.Constraint for one generation: `spec` is a compiled Grammar or a spec
        dict for compile_constraint (validated: BadConstraint names the part at fault); None -> None."""
        if spec is None:
            return None
        from llamaexport.runtime.constraint import Constraint, Grammar, compile_constraint
        grammar = spec if isinstance(spec, Grammar) else compile_constraint(
            spec, self.require_tokenizer(), n_vocab=self.config.vocab_size)
        return None if grammar is None else Constraint(grammar)

    def encode(self, text: str) -> list[int]:
        tok = self.require_tokenizer()
        # a chat template that already starts with the BOS text must not get a second BOS
        bos_text = tok.decode([tok.bos_id], skip_special=False) if tok.bos_id is not None else None
        add_bos = tok.add_bos and not (bos_text and text.startswith(bos_text))
        return tok.encode(text, add_bos=add_bos)

    # ------------------------------------------------------------------ core loop
    def steps(self, prompts: list[list[int]], *, max_new_tokens: int = 128,
              sampling: SamplingConfig | None = None, eos_ids=None,
              on_logits: Callable[[np.ndarray], None] | None = None, logprobs: int | None = None,
              on_logprobs: Callable[[list[TokenLogprob]], None] | None = None,
              constraints: list | None = None, speculative=None, spec_stats=None) -> Iterator[np.ndarray]:
        """Generate for a batch of token-id prompts (left-padded together), yielding the new
        token of every row [B] after each step. Rows that reached EOS keep yielding EOS.

        on_logits: receives each forward's logits (`check` collects them): the prefill's for every
        prompt position [B, S, V], then each decode step's [B, 1, V].
        on_logprobs: receives, before each step's tokens are yielded, their logprobs (one per row, each with
        `logprobs` alternatives) from the raw logits: sampling.token_logprobs, as in the serving engine.
        constraints: per row, a runtime.constraint.Constraint or None; each row's next-token mask is filled
        on a worker thread during the forward and applied by the Sampler (as in the serving engine). The
        caller advances them: consume each yielded token (runtime.completion.Completion does) before
        asking for the next.
        speculative: a runtime.speculative.Speculation; with one prompt, tokens are drafted and verified
        several per forward (identical greedy output; the same distribution when sampling), yielded one by
        one; spec_stats (a SpecStats) counts the forwards and accepted drafts. A batch decodes as usual."""
        sampling = sampling or SamplingConfig()
        sampling.check_vocab(self.config.vocab_size)
        eos_ids = eos_set(self.tokenizer, eos_ids)
        eos = np.array(sorted(eos_ids) or [-1])
        B, lens = len(prompts), self._checked_lengths(prompts)
        if speculative is not None and B == 1:
            if on_logits is not None:
                raise LlamaExportError("on_logits (check) runs without speculation: its forwards are one token each")
            if constraints is not None and len(constraints) != 1:
                raise LlamaExportError(f"{len(constraints)} constraints for 1 prompt")
            yield from self._speculative_steps(prompts[0], max_new_tokens=max_new_tokens, sampling=sampling,
                                               eos_ids=eos_ids, logprobs=logprobs, on_logprobs=on_logprobs,
                                               constraint=constraints[0] if constraints else None,
                                               spec=speculative, stats=spec_stats)
            return
        if len(set(lens)) > 1 and not self.manifest.get("left_padding", True):
            if on_logits is not None or on_logprobs is not None:
                raise LlamaExportError("on_logits and on_logprobs need prompts of one length on this graph (no left padding)")
            # this graph's fused attention (GroupQueryAttention) assumes unpadded rows: run each
            # row alone, in lockstep, so the batch API keeps its meaning
            yield from self._lockstep(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                                      eos_ids=eos_ids, fill=int(eos[0]), constraints=constraints)
            return
        yield from self._batched_steps(prompts, lens, max_new_tokens=max_new_tokens, sampling=sampling, eos=eos,
                                       on_logits=on_logits, logprobs=logprobs, on_logprobs=on_logprobs,
                                       constraints=constraints)

    def _batched_steps(self, prompts, lens, *, max_new_tokens, sampling, eos, on_logits, logprobs, on_logprobs,
                       constraints) -> Iterator[np.ndarray]:
        """steps() for left-padded rows decoded together, one token per row per forward."""
        B, ctx = len(prompts), self.config.max_seq_len
        masks = _mask_worker(constraints, B)
        S = max(lens)
        max_new_tokens = max(0, min(max_new_tokens, ctx - S))
        ids, mask, pos = self._left_padded(prompts, S)
        sampler = Sampler(sampling)
        penalize = sampling.repetition_penalty != 1.0
        seen = [np.asarray(p, np.int64) for p in prompts]
        generated = [[] for _ in prompts] if sampling.presence_penalty or sampling.frequency_penalty else None
        done = np.zeros(B, bool)
        cache = self.backend.take_cache(B)
        try:
            pending = masks.submit(constraints) if masks else None  # filled while the forward runs
            logits, cache = self.backend.forward(ids, mask, pos, cache, last_only=on_logits is None)
            if on_logits is not None:
                on_logits(logits)
            # Decode steps reuse their input arrays, updated in place (the backend then keeps its bindings),
            # and the mask is a growing view of one buffer: Python's share of a step stays small.
            full_mask = np.ones((B, S + max_new_tokens), np.int64)
            full_mask[:, :S] = mask
            cur = np.empty((B, 1), np.int64)
            next_pos = pos[:, -1:] + 1
            for step in range(max_new_tokens):
                if pending is not None:
                    pending.result()
                live = None if masks is None else [None if d else c for c, d in zip(constraints, done)]
                tok = sampler(logits[:, -1], seen if penalize else None, generated, live)
                if done.any():
                    tok = np.where(done, eos[0], tok)
                if on_logprobs is not None:
                    on_logprobs(token_logprobs(logits[:, -1], tok, logprobs or 0))
                if penalize:
                    seen = [np.append(s, t) for s, t in zip(seen, tok)]
                if generated is not None:
                    for g, t in zip(generated, tok.tolist()):
                        g.append(t)
                done |= (tok[:, None] == eos).any(1)
                yield tok
                if done.all() or step == max_new_tokens - 1:
                    return
                cur[:, 0] = tok
                if masks is not None:  # the caller consumed the tokens (a finished row's grammar is left alone)
                    pending = masks.submit([None if d else c for c, d in zip(constraints, done)])
                logits, cache = self.backend.forward(cur, full_mask[:, :S + step + 1], next_pos, cache, last_only=True)
                if on_logits is not None:
                    on_logits(logits)
                next_pos += 1
        finally:  # the generation is over (or abandoned): its cache may serve the next one
            self.backend.give_back_cache(B, cache)
            if masks is not None:
                masks.close()

    def _speculative_steps(self, prompt: list[int], *, max_new_tokens, sampling, eos_ids, logprobs, on_logprobs,
                           constraint, spec, stats) -> Iterator[np.ndarray]:
        """steps() for one prompt with speculation (runtime.speculative): each forward feeds the last token and
        the drafts over a one-slot cache, the verified tokens are yielded one by one (the caller consumes each
        into the constraint before the next is picked), and the cache is cut back past the rejected drafts."""
        from llamaexport.runtime.slots import make_slots
        from llamaexport.runtime.speculative import SpecStats, fit_to_grammar, make_proposer, verified

        stats = stats if stats is not None else SpecStats()
        proposer = make_proposer(spec, self)
        slots = make_slots(self.backend, 1)
        masks = _mask_worker(None if constraint is None else [constraint], 1)
        sampler = Sampler(sampling)
        penalize = sampling.repetition_penalty != 1.0
        openai = bool(sampling.presence_penalty or sampling.frequency_penalty)
        ctx = self.config.max_seq_len
        limit = max(0, min(max_new_tokens, ctx - len(prompt)))
        ids, gen = list(prompt), []
        drafts, qs, tail = [], None, None
        try:
            if limit == 0:
                return
            pending = masks.submit([constraint]) if masks else None
            logits = slots.prefill(0, ids)[None]  # [1, V]
            while True:
                if pending is not None:
                    pending.result()  # position 0's mask, filled during the forward
                # logits [len(drafts) + 1, V]: row i picks the (i + 1)-th token
                accepted = 0
                for i, t, hit, more in verified(sampler, logits, drafts, qs, tail, constraint, seen=ids,
                                                generated=gen, penalize=penalize, openai=openai,
                                                done=lambda t: t in eos_ids or len(gen) == limit):
                    if on_logprobs is not None:
                        on_logprobs(token_logprobs(logits[i:i + 1], [t], logprobs or 0))
                    accepted += hit
                    if more:
                        yield np.array([t])  # the caller consumes it before the next position is picked
                if len(gen) > 1:  # a verify forward (the first token came from the prompt's)
                    stats.add(len(drafts), accepted, i + 1)
                yield np.array([t])
                if t in eos_ids or len(gen) == limit:
                    return
                slots.truncate(0, len(ids) - 1)  # the fed ids the model agreed with; t is fed next
                k = min(spec.k, limit - len(gen) - 1, ctx - len(ids))
                drafts, qs = proposer.propose(ids, k, sampler) if k > 0 else ([], None)
                drafts, qs, tail = fit_to_grammar(constraint, drafts, qs)
                pending = masks.submit([constraint]) if masks else None
                logits = slots.prefill(0, [t, *drafts], all_logits=True) if drafts else slots.prefill(0, [t])[None]
        finally:
            slots.close()
            if hasattr(proposer, "close"):
                proposer.close()
            if masks is not None:
                masks.close()

    def _checked_lengths(self, prompts: list[list[int]]) -> list[int]:
        """The prompts' lengths, each checked against the context (check_generation)."""
        lens = [len(p) for p in prompts]
        if not lens:
            raise LlamaExportError("empty prompt: give at least one token")
        for n in (min(lens), max(lens)):
            check_generation(prompt_tokens=n, context=self.config.max_seq_len)
        return lens

    def _left_padded(self, prompts: list[list[int]], S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids, attention_mask and position_ids [B, S] of prompts left-padded to S ids."""
        pad = self.tokenizer.pad_id if self.tokenizer and self.tokenizer.pad_id is not None else 0
        ids = np.full((len(prompts), S), pad, np.int64)
        mask = np.zeros((len(prompts), S), np.int64)
        for b, p in enumerate(prompts):
            ids[b, S - len(p):] = p
            mask[b, S - len(p):] = 1
        return ids, mask, np.maximum(mask.cumsum(1) - 1, 0)

    def _lockstep(self, prompts, *, max_new_tokens, sampling, eos_ids, fill, constraints=None) -> Iterator[np.ndarray]:
        """Rows generated one by one but yielded together; a finished row yields `fill` (EOS).
        Each row samples from its own seeded stream."""
        gens = [self.steps([p], max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                           constraints=None if constraints is None else [constraints[b]])
                for b, p in enumerate(prompts)]
        live = [True] * len(gens)
        while True:
            out = np.full(len(gens), fill, np.int64)
            for b, it in enumerate(gens):
                if live[b]:
                    t = next(it, None)
                    if t is None:
                        live[b] = False
                    else:
                        out[b] = t[0]
            if not any(live):
                return
            yield out

    def generate_ids(self, prompts: list[list[int]], *, max_new_tokens: int = 128,
                     sampling: SamplingConfig | None = None, eos_ids=None) -> list[list[int]]:
        """New token ids per row, each cut after its first EOS (EOS included)."""
        check_generation(max_new_tokens=max_new_tokens)
        eos_ids = eos_set(self.tokenizer, eos_ids)
        out = [[] for _ in prompts]
        finished = [False] * len(prompts)
        for tok in self.steps(prompts, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids):
            for b, t in enumerate(tok.tolist()):
                if not finished[b]:
                    out[b].append(t)
                    finished[b] = t in eos_ids
        return out

    # ------------------------------------------------------------------ text API
    def stream(self, prompt: str, *, max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
               stop: list[str] | tuple = (), chat: bool | str = False, system: str | None = None,
               result: list | None = None, logprobs: int | None = None, constraint=None,
               speculative=None, response_format=None) -> Iterator[str]:
        """Yield text pieces as they are generated; stops at EOS, a stop string or the length (one
        runtime.completion.Completion decides, as in the serving engine). If `result` is a list, the
        final `Generation` is appended to it (with logprobs: its tokens' logprobs, each with that many
        alternatives, 0 .. 20). constraint: the reply follows a grammar, given as a compiled
        runtime.constraint.Grammar or a spec for `compile_constraint` (OpenAI's response_format:
        {"type": "json_schema", "json_schema": {"schema": ...}}, {"type": "json_object"}; or
        {"type": "regex" | "gbnf" | "lark", ...}); it ends with "stop" once the grammar is complete.
        response_format: the same, under OpenAI's name (give one of the two).
        speculative: a runtime.speculative.Speculation (prompt lookup or a draft artifact): the same text
        (greedy) in fewer forwards; Generation.speculation counts them."""
        check_generation(max_new_tokens=max_new_tokens, stop=stop, prompt=prompt, logprobs=logprobs)
        if response_format is not None:
            if constraint is not None:
                raise LlamaExportError("give constraint or response_format, not both (they are one setting)")
            constraint = response_format
        if system is not None:
            check_generation(max_new_tokens=max_new_tokens, prompt=system)
        tok = self.require_tokenizer()
        if chat and not stop:
            from llamaexport.model.chat import default_stop_strings
            stop = default_stop_strings(chat if isinstance(chat, str) else self.chat_format)
        row = self.constraint(constraint)
        ids = self.encode(self.format_prompt(prompt, chat=chat, system=system))
        # steps() stops at the context too: a length finish there
        limit = min(max_new_tokens, self.config.max_seq_len - len(ids))
        out = Completion(tok, prompt_ids=ids, stop=stop, eos_ids=eos_set(tok), max_new_tokens=limit, constraint=row)
        step_lps: list[list[TokenLogprob]] = []  # the step's, from steps()' on_logprobs
        stats = None
        if speculative is not None:
            from llamaexport.runtime.speculative import SpecStats
            stats = SpecStats()
        for t in self.steps([ids], max_new_tokens=max_new_tokens, sampling=sampling, logprobs=logprobs,
                            on_logprobs=None if logprobs is None else step_lps.append,
                            constraints=None if row is None else [row], speculative=speculative,
                            spec_stats=stats):
            piece = out.push(int(t[0]), step_lps.pop()[0] if step_lps else None)
            if piece:
                yield piece
            if out.reason is not None:
                break
        if out.reason is FinishReason.ERROR:
            raise LlamaExportError(out.error)
        piece = out.finish()
        if piece:
            yield piece
        if result is not None:
            result.append(Generation(text=out.text, token_ids=out.token_ids, prompt_tokens=len(ids),
                                     finish_reason=out.reason, logprobs=None if logprobs is None else out.logprobs,
                                     speculation=stats))

    def generate(self, prompt: str, *, max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
                 stop: list[str] | tuple = (), chat: bool | str = False, system: str | None = None,
                 on_text: Callable[[str], None] | None = None, logprobs: int | None = None,
                 constraint=None, speculative=None, response_format=None) -> Generation:
        """Generate a completion for one prompt; `on_text` receives the streamed pieces. logprobs: also
        return each token's logprob and this many alternatives (Generation.logprobs; the same routine as
        the server's)."""
        result: list[Generation] = []
        for piece in self.stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                                 chat=chat, system=system, result=result, logprobs=logprobs, constraint=constraint,
                                 speculative=speculative, response_format=response_format):
            if on_text:
                on_text(piece)
        return result[0]


def _mask_worker(constraints: list | None, rows: int):
    """A MaskWorker when some row is constrained (it fills their masks during the forward), else None."""
    if constraints is None:
        return None
    if len(constraints) != rows:
        raise LlamaExportError(f"{len(constraints)} constraints for {rows} prompts")
    if all(c is None for c in constraints):
        return None
    from llamaexport.runtime.constraint import MaskWorker

    return MaskWorker()
