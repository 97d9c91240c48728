"""The TensorRT backend: runs engine.plan with the same interface as OnnxRuntimeBackend.

Device memory is torch CUDA tensors (torch is on every TensorRT machine; tensorrt and torch are
imported when the backend is created). The KV cache stays on the GPU between steps, in the
manifest's kv_cache form (model.kv_form.KVForm):
  CONCAT   the cache is the list of present tensors of the previous step, bound as the next step's
           past without a copy (the engine concatenates: a new present per step; runtime.slots.ConcatSlots
           pads and stacks per-slot caches with join_rows / split_rows)
  INPLACE  one max-length buffer per tensor, bound as both past and present: the engine's KV-cache
           update layer writes the new entries in place (runtime.slots.InplaceSlots serves rows of it,
           each with its own length)
Only the kept logits cross to the host (num_logits_to_keep = 1 unless every position is asked for),
through a pinned buffer.

One execution context per optimization profile, created once (tensorrt/builder.py builds them):
  prefill  1..L tokens on an empty cache (in place: on any cache)
  decode   one token on a cache
A multi-token step on a non-empty concat cache (chunked prefill) runs as single-token decode steps.
Each context keeps its profile (switching a context's profile makes TensorRT update layer
resources on the next enqueue), and both share ONE activation region: they are created with
ExecutionContextAllocationStrategy.USER_MANAGED and given the same buffer of
engine.device_memory_size_v2 bytes, "the maximum device memory required by the context over all
profiles". With the default (kSTATIC) each context would allocate that much for itself. Sharing is
safe because the contexts run one after the other on one stream (setDeviceMemoryV2: only contexts
"running in parallel" must not share). Sources: include/NvInferRuntime.h and
python/src/infer/pyCore.cpp of NVIDIA/TensorRT release/10.3, 10.16, 11.0 and 11.1 (all bind
create_execution_context(strategy), device_memory_size_v2 and set_device_memory(memory, size));
10.0 has only device_memory_size and the `device_memory` property (setDeviceMemory).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llamaexport import LlamaExportError
from llamaexport.model.config import LlamaConfig
from llamaexport.model.kv_form import KVForm, SpareCache


def _torch_dtypes(trt, torch) -> dict:
    pairs = [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT64", torch.int64),
             ("INT32", torch.int32), ("INT8", torch.int8), ("UINT8", torch.uint8), ("BOOL", torch.bool)]
    return {getattr(trt.DataType, n): t for n, t in pairs if hasattr(trt.DataType, n)}


def _activation_size(engine) -> int:
    """Bytes of activation memory the engine's largest profile needs (getDeviceMemorySizeV2, 10.1+;
    10.0's getDeviceMemorySize)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def _set_device_memory(ctx, ptr: int, size: int):
    """Give a USER_MANAGED context its activation memory: setDeviceMemoryV2(ptr, size) where the
    bindings have it (10.1+), else 10.0's setDeviceMemory(ptr) through the `device_memory` property."""
    if hasattr(ctx, "set_device_memory"):
        ctx.set_device_memory(ptr, size)
    else:
        ctx.device_memory = ptr


class TensorRTBackend(SpareCache):
    """Runs `engine.plan` on the GPU (a runtime.Backend); `forward` returns host logits and a GPU cache."""

    threads = None

    def __init__(self, artifact_dir, manifest: dict, cfg: LlamaConfig):
        from llamaexport.tensorrt.api import Stage, make_logger, require_tensorrt
        from llamaexport.tensorrt.plugins import find_plugin_library, load_plugins

        d = Path(artifact_dir)
        eng = manifest.get("engine")
        if not eng:
            raise LlamaExportError(f"{d} has no TensorRT engine (built with --export-only); run `llamaexport compile "
                                   f"{d}` on the GPU machine, or use --backend onnxruntime")
        trt = require_tensorrt("run the artifact's ONNX on the CPU with --backend onnxruntime",
                               what="the tensorrt backend")
        try:
            import torch
        except ImportError:
            raise LlamaExportError("the TensorRT backend keeps tensors on the GPU with PyTorch, which is not "
                                   "installed (pip install torch, a CUDA build)") from None
        if torch.version.cuda is None:
            raise LlamaExportError(f"the TensorRT backend keeps tensors on the GPU with PyTorch, and this PyTorch "
                                   f"({torch.__version__}) is a CPU-only build; install a CUDA build (see "
                                   "pytorch.org), or use --backend onnxruntime")
        if not torch.cuda.is_available():
            raise LlamaExportError("the TensorRT backend needs a CUDA GPU and none is visible; "
                                   "run the artifact's ONNX on the CPU with --backend onnxruntime")
        if eng.get("tensorrt") not in (None, trt.__version__):
            raise LlamaExportError(f"{d}/{eng['file']} was built with TensorRT {eng['tensorrt']}, this is "
                                   f"{trt.__version__}; rebuild it with `llamaexport compile {d} --force`")
        plan = d / eng["file"]
        if not plan.is_file():
            raise LlamaExportError(f"{plan} is missing; rebuild it with `llamaexport compile {d} --force`")
        recorded = eng.get("plugin_library")
        lib = find_plugin_library() or (Path(recorded) if recorded and Path(recorded).is_file() else None)
        self.logger = make_logger(trt)
        load_plugins(trt, lib, required=bool(eng.get("plugin_layers")), logger=self.logger)  # before deserializing

        self.cfg, self._torch, self._trt = cfg, torch, trt
        stage = Stage(trt, self.logger)
        try:
            self._load(stage, d, plan, eng, manifest)
        except LlamaExportError:
            raise
        except Exception as e:  # a binding raised: say which step, with TensorRT's own message
            raise stage.error(e, f"if the engine is at fault, `llamaexport compile {d} --force` rebuilds it") from None

    def _load(self, stage, d: Path, plan: Path, eng: dict, manifest: dict):
        trt, torch = self._trt, self._torch
        stage.now = f"loading {plan.name}"
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise LlamaExportError(f"TensorRT cannot load {plan} ({self.logger.last_error}); an engine only runs on "
                                   f"the GPU model it was built on: `llamaexport compile {d} --force` here")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        io = manifest["io"]
        missing = sorted((set(io["inputs"]) | set(io["outputs"])) - names)
        if missing:
            raise LlamaExportError(f"{plan} lacks the tensors {', '.join(missing[:4])} of the manifest; "
                                   f"rebuild it with `llamaexport compile {d} --force`")
        to_torch = _torch_dtypes(trt, torch)
        self.dtypes = {n: to_torch[self.engine.get_tensor_dtype(n)] for n in names}
        self.past_names = [n for n in io["inputs"] if n.startswith("past_key_values.")]
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]
        self.kv_form = KVForm.of(manifest)
        self.keep_input = "num_logits_to_keep" in io["inputs"]
        self.kv_dtype = self.dtypes[self.past_names[0]] if self.past_names else torch.float32
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._dummy = torch.empty(256, dtype=torch.uint8, device=self.device)  # address for empty tensors
        self.profiles, self.contexts = {}, {}
        stage.now = "allocating the activation memory"
        size = _activation_size(self.engine)  # the largest profile's
        try:
            with torch.cuda.stream(self.stream):
                self._activations = torch.empty(size, dtype=torch.uint8, device=self.device)
        except torch.cuda.OutOfMemoryError:
            raise LlamaExportError(f"not enough GPU memory for the engine's activations ({size / 2**20:.0f} MiB); "
                                   "close other GPU programs, or rebuild with a smaller batch or --max-seq-len") from None
        self.activation_bytes = size
        for p in eng["profiles"]:  # {name, index, batch, seq, past}: see tensorrt.builder.profile_shapes
            stage.now = f"creating the {p['name']} execution context"
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise LlamaExportError(f"TensorRT {trt.__version__} could not create the {p['name']} execution "
                                       f"context ({self.logger.last_error}); close other GPU programs")
            _set_device_memory(ctx, self._activations.data_ptr(), size)  # the region both contexts share
            stage.now = f"selecting the {p['name']} optimization profile"
            ctx.set_optimization_profile_async(p["index"], self.stream.cuda_stream)
            self.profiles[p["name"]], self.contexts[p["name"]] = p, ctx
        self.stream.synchronize()
        self.dir, self.last_profile = d, None
        self._keep = {}      # num_logits_to_keep value -> its tensor (host memory when it is a shape tensor)
        self._pinned = None  # page-locked host buffer the kept logits are copied through
        self._spare = None   # (batch, cache) of a finished generation (in place: take_cache recycles it)

    @property
    def device_memory_bytes(self) -> int:
        """The engine's activation memory (the one region both contexts share), for bench and gpu_check."""
        return self.activation_bytes

    def empty_cache(self, batch: int):
        c = self.cfg
        # in place: one max-length buffer (zeros: masked, never NaN); concat: an empty past
        length = c.max_seq_len if self.kv_form is KVForm.INPLACE else 0
        with self._torch.cuda.stream(self.stream):  # zeroed on the engine's stream, so it is done before a step reads it
            return [self._torch.zeros((batch, c.n_kv_heads, length, c.head_dim), dtype=self.kv_dtype, device=self.device)
                    for _ in self.past_names]

    def slot_cache(self, n: int) -> dict:
        return {"bufs": self.empty_cache(n)}

    def run_slots(self, state: dict, lo: int, ids, mask, pos, *, all_logits: bool = False) -> np.ndarray:
        """Rows lo .. lo + len(ids) of a slot_cache (views: the batch is the outermost dimension, so a row
        range is contiguous) as past and present; the last position's logits [rows, V] (all_logits: every
        position's, [rows, S, V])."""
        k = len(ids)
        logits, _ = self._execute(ids, mask, pos, [t[lo:lo + k] for t in state["bufs"]], keep=0 if all_logits else 1)
        return logits if all_logits else logits[:, -1]

    def copy_slot_prefix(self, state: dict, src: int, dst: int, n: int):
        """Row dst of every slot_cache buffer gets row src's first n positions, on the GPU, on the engine's
        stream (ordered before the next forward)."""
        with self._torch.cuda.stream(self.stream):
            for t in state["bufs"]:
                t[dst, :, :n].copy_(t[src, :, :n])  # [K, n, hd]

    def join_rows(self, caches: list[list], length: int) -> list:
        """ConcatSlots' decode batch: per cache tensor, the slots' [1, K, n, hd] caches left-padded with zeros
        to `length` positions and stacked into one [rows, K, length, hd] tensor on the GPU."""
        torch = self._torch

        def pad(x):
            n = x.shape[2]
            return x if n == length else torch.cat([x.new_zeros(x.shape[:2] + (length - n,) + x.shape[3:]), x], dim=2)
        return [torch.cat([pad(c[i]) for c in caches], dim=0) for i in range(len(caches[0]))]

    def split_rows(self, present: list, keep: list[int]) -> list[list]:
        """A forward's presents [rows, K, T, hd] as each row's own cache: row r's last keep[r] positions,
        [1, K, keep[r], hd] (views on the GPU, no copy)."""
        return [[p[r:r + 1, :, p.shape[2] - k:] for p in present] for r, k in enumerate(keep)]

    def close(self):
        """Release the execution contexts, their activation memory, the engine and the runtime, in that order."""
        if getattr(self, "stream", None) is not None:
            self.stream.synchronize()
        self.contexts = {}
        self._activations = None
        self.engine = self.runtime = None
        self._dummy = self._pinned = self._spare = None
        self._keep = {}

    @property
    def max_batch(self) -> int:
        """The most rows every optimization profile accepts (the serving engine's slot limit)."""
        return min(p["batch"][1] for p in self.profiles.values())

    def _profile_for(self, B: int, S: int, P: int) -> str:
        """P: the cached tokens before the S new ones. Concat: prefill on an empty cache, decode after;
        in place: prefill for every multi-token step (a prompt's chunk on a cache too), decode for one."""
        name = ("decode" if S == 1 else "prefill") if self.kv_form is KVForm.INPLACE else ("prefill" if P == 0 else "decode")
        p = self.profiles.get(name)
        if p is None:
            raise LlamaExportError(f"this engine has no {name} profile; rebuild it with "
                                   f"`llamaexport compile {self.dir} --force`")
        if B > p["batch"][1]:
            raise LlamaExportError(f"batch {B} exceeds the engine's maximum {p['batch'][1]}; rebuild with a profile "
                                   f"whose default_batch is at least {B}")
        if P + S > self.cfg.max_seq_len or not p["seq"][0] <= S <= p["seq"][1] or not p["past"][0] <= P <= p["past"][1]:
            raise LlamaExportError(f"{P} cached + {S} new tokens do not fit the engine's context "
                                   f"{self.cfg.max_seq_len}; rebuild with a larger --max-seq-len")
        return name

    def forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool = False):
        """last_only: only the last position's logits are computed and copied to the host."""
        torch = self._torch
        if any(not isinstance(t, torch.Tensor) or t.device.type != "cuda" for t in cache):
            raise LlamaExportError("the cache does not come from this backend; start from backend.empty_cache(batch)")
        ids, mask, pos = (np.array(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids))  # copies
        B, S = ids.shape
        in_place = self.kv_form is KVForm.INPLACE
        P = mask.shape[1] - S if in_place or not cache else int(cache[0].shape[2])
        if mask.shape != (B, P + S):
            raise LlamaExportError(f"attention_mask is {mask.shape}, expected {(B, P + S)} (cached + new tokens)")
        if S > 1 and P > 0 and not in_place:  # chunked prefill: no concat profile has both; one token at a time
            rows = []
            for j in range(S):
                last = last_only and j < S - 1
                logits, cache = self.forward(ids[:, j:j + 1], mask[:, :P + j + 1], pos[:, j:j + 1], cache, last)
                rows.append(logits)
            return (rows[-1] if last_only else np.concatenate(rows, axis=1)), cache
        logits, present = self._execute(ids, mask, pos, cache, keep=1 if last_only else 0)
        return logits, (cache if in_place else present)

    def _execute(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list, *, keep: int):
        """One engine run. past: the cache tensors (in place: also bound as the presents, which the
        engine's KV-cache update writes into: IKVCacheUpdateLayer's output shares its input's memory).
        Returns (host logits [B, keep or S, V] float32, the new presents (concat) or None)."""
        torch = self._torch
        B, S = ids.shape
        in_place = self.kv_form is KVForm.INPLACE
        name = self._profile_for(B, S, mask.shape[1] - S)
        ctx = self.contexts[name]
        with torch.cuda.stream(self.stream):  # allocations, copies and the engine on one stream
            feeds = {n: torch.from_numpy(a).to(self.device, self.dtypes[n])
                     for n, a in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos))}
            feeds.update(zip(self.past_names, past))
            for n, t in feeds.items():
                if t.dtype != self.dtypes[n]:
                    raise LlamaExportError(f"{n} is {t.dtype}, the engine takes {self.dtypes[n]}")
                if not ctx.set_input_shape(n, tuple(t.shape)):
                    raise LlamaExportError(f"the engine's {name} profile does not accept {n} of shape "
                                           f"{tuple(t.shape)} ({self.logger.last_error})")
                ctx.set_tensor_address(n, (t if t.numel() else self._dummy).data_ptr())  # inputs need non-null
            if self.keep_input:  # before the output shapes: the logits' length depends on its value
                ctx.set_tensor_address("num_logits_to_keep", self._keep_tensor(keep).data_ptr())
            outs = {}
            if in_place:
                for n, t in zip(self.present_names, past):
                    ctx.set_tensor_address(n, t.data_ptr())
            for n in ["logits"] + ([] if in_place else self.present_names):
                shape = tuple(ctx.get_tensor_shape(n))  # logits [B, keep or S, V], present [B, K, P + S, hd]
                if any(s < 0 for s in shape):
                    raise LlamaExportError(f"TensorRT could not infer the shape of {n} ({self.logger.last_error})")
                outs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
                ctx.set_tensor_address(n, outs[n].data_ptr())
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise LlamaExportError(f"TensorRT failed to run the engine ({self.logger.last_error})")
            logits = self._to_host(outs["logits"])
        self.last_profile = name
        return logits, (None if in_place else [outs[n] for n in self.present_names])

    def _keep_tensor(self, keep: int):
        """num_logits_to_keep's value where the engine reads it: a shape tensor is read from host memory
        (ICudaEngine::getTensorLocation kHOST, NvInferRuntime.h setTensorAddress), page-locked here."""
        t = self._keep.get(keep)
        if t is None:
            torch = self._torch
            t = torch.tensor(keep, dtype=torch.int64)
            if self.engine.get_tensor_location("num_logits_to_keep") == self._trt.TensorLocation.DEVICE:
                t = t.to(self.device)
            else:
                t = t.pin_memory()
            self._keep[keep] = t
        return t

    def _to_host(self, logits) -> np.ndarray:
        """Copy the kept logits through a reused page-locked buffer (a pageable destination would make
        CUDA stage the copy); returns an array of its own, since the buffer is overwritten next step."""
        torch = self._torch
        logits = logits.float()
        n = logits.numel()
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(n, dtype=torch.float32, pin_memory=True)
        host = self._pinned[:n].view(logits.shape)
        host.copy_(logits, non_blocking=True)
        self.stream.synchronize()
        return host.numpy().copy()
