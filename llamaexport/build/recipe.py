"""The build recipe: every rule that decides what a build makes, in one frozen object.

A `Recipe` is resolved once from what the user asked (profile, precision, int4 recipe, block size,
quantization method, whether there is text to calibrate on), validating each input with one
error message. It then answers, per linear role, how that tensor is stored (precision, block,
symmetric or not: a `quantize.QuantForm`), and the graph-form choices (activation dtype, fused
attention, quantized embedding and output layer, the KV-cache form). It writes its
own manifest fields. The planner, the export and the build take a Recipe; `quantize.py` holds
only the arithmetic. The reasons behind each rule (and the figures that chose them) are in
docs/quantization.md.
"""

from __future__ import annotations

import dataclasses
import enum

from llamaexport import LlamaExportError
from llamaexport.build.quantize import QuantForm
from llamaexport.model.kv_form import KVForm
from llamaexport.tensorrt.api import version_tuple


class Precision(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    W8A8 = "w8a8"  # SmoothQuant: int8 weights and int8 activations into QKV and gate/up (TensorRT)


class Target(enum.StrEnum):
    """The graph form: the portable one (TensorRT, any ONNX runtime) or ONNX Runtime's CPU graph."""
    PORTABLE = "portable"
    ORT_CPU = "ort-cpu"

    @classmethod
    def for_profile(cls, profile) -> Target:
        """ONNX Runtime on the CPU gets its own graph; TensorRT and ONNX Runtime on a GPU (a profile whose
        [runtime] device is cuda) the portable one (fp16 activations, standard ops)."""
        return cls.ORT_CPU if profile.backend == "onnxruntime" and profile.device == "cpu" else cls.PORTABLE


# How the portable graph keeps its KV cache (model.kv_form.KVForm; the CPU graph's GroupQueryAttention
# always writes in place):
#   concat   present = past ++ new (Concat): every decode step copies the whole past into a new
#            buffer; attention is MatMul -> Add(mask) -> Softmax -> MatMul, which every TensorRT 10.x
#            parses (JetPack 6's 10.3 included) and may fuse into one MHA kernel. Opset 21.
#   inplace  past and present are one max-length buffer [batch, kv_heads, context, head_dim], updated
#            in place by TensorScatter (opset 24), which TensorRT's parser maps to IKVCacheUpdateLayer,
#            and attention is the ONNX Attention op, which it maps to IAttention (its fused attention):
#            TensorRT >= 10.15 (CHANGELOG.md of NVIDIA/TensorRT: 10.14 added Attention, 10.15
#            TensorScatter; parser sources: onnxOpImporters.cpp `TensorScatter`, `Attention`).
KV_CACHE_CHOICES = ("auto", *(f.name.lower() for f in KVForm))  # what --kv-cache accepts: auto, concat, inplace
INPLACE_MIN_TENSORRT = (10, 15)  # TensorScatter -> IKVCacheUpdateLayer (the Attention op alone: 10.14)
OPSET_CONCAT, OPSET_INPLACE = 21, 24  # TensorScatter is opset 24; the concat graph stays where 10.3 parses it


def kv_cache_for(profile, requested: str | KVForm = "auto", *, tensorrt: str | None = None) -> KVForm:
    """The KV-cache form a build makes. auto: in place when the TensorRT that builds the engine (the one
    installed here, else the profile's tensorrt_version: the target's) is >= 10.15, else concat; ONNX
    Runtime on a GPU: concat (its CUDA TensorScatter kernel is newer than the onnxruntime we require)."""
    if requested not in KV_CACHE_CHOICES and not isinstance(requested, KVForm):
        raise LlamaExportError(f"unknown --kv-cache {requested!r}; choose {', '.join(KV_CACHE_CHOICES)}")
    if Target.for_profile(profile) is Target.ORT_CPU:
        if requested != "auto" and KVForm.named(requested) is KVForm.INPLACE:
            raise LlamaExportError(f"--kv-cache inplace is for GPU profiles; the {profile.name} graph's "
                                   "GroupQueryAttention already updates its cache in place (leave --kv-cache at auto)")
        return KVForm.CONCAT
    if requested != "auto":
        return KVForm.named(requested)
    version = tensorrt or (profile.tensorrt_version if profile.backend == "tensorrt" else None)
    return KVForm.INPLACE if version and version_tuple(version) >= INPLACE_MIN_TENSORRT else KVForm.CONCAT


class Int4Recipe(enum.StrEnum):
    ACCURATE = "accurate"  # the most sensitive projections (and the CPU output layer) stay 8-bit
    COMPACT = "compact"    # every linear and the CPU output layer 4-bit: fewest bytes, fastest decode


class QuantMethod(enum.StrEnum):
    RTN = "rtn"                  # round to nearest (no calibration text)
    AWQ = "awq"                  # AWQ scales, importance-weighted rounding, bias correction
    GPTQ = "gptq"                # AWQ scales, then GPTQ rounding
    SMOOTHQUANT = "smoothquant"  # w8a8 only


PRECISIONS = tuple(p.value for p in Precision)
PREFERENCE = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4)  # most accurate first: auto's order
EXPLICIT_ONLY = (Precision.W8A8,)  # planned like int8 but less accurate: never chosen by `auto`
QUANT_METHOD_CHOICES = ("auto", "rtn", "awq", "gptq")  # what --quant-method accepts
INT4_RECIPES = tuple(r.value for r in Int4Recipe)

# linear group (awq.py, the export's layer loop) -> role (manifest, node names); the output layer is LM_HEAD
ROLES = {"qkv": "qkv_proj", "o": "o_proj", "gate_up": "gate_up_proj", "down": "down_proj"}
LM_HEAD = "lm_head"

BLOCK_SIZES = (16, 32, 64, 128, 256)  # what --block-size accepts
DEFAULT_BLOCK = 32      # 4-bit tensors and the CPU output layer, without --block-size
COMPACT_BLOCK = 64      # the CPU compact int4 recipe's 4-bit block: about llama.cpp's Q4_0 bytes
CPU_8BIT_BLOCK = 128    # the CPU graph's 8-bit layer projections (their int8 activations share the block)
EMBED_BLOCK = 32        # the CPU graph's 8-bit embedding table (GatherBlockQuantized), along the hidden dim

# int4 (accurate) keeps these roles 8-bit, as llama.cpp's Q4_K_M keeps attn_v / ffn_down at 6 bits;
# TensorRT's INT4 has no zero points, so the portable graph keeps o_proj at 8 bits too
INT4_8BIT_ROLES = {Target.ORT_CPU: ("qkv_proj", "down_proj"), Target.PORTABLE: ("qkv_proj", "o_proj", "down_proj")}
# w8a8 quantizes the activations of these roles (prefill's large GEMMs); o and down stay weight-only int8
W8A8_ACTIVATION_ROLES = ("qkv_proj", "gate_up_proj")


def _choice(kind, value, what: str):
    try:
        return kind(value)
    except ValueError:
        raise LlamaExportError(f"unknown {what} {value!r}; choose one of {', '.join(m.value for m in kind)}") from None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one build makes. Construct with `Recipe.resolve` (or `for_profile` / `candidates`)."""

    precision: Precision
    target: Target
    int4_recipe: Int4Recipe | None  # int4 only
    block: int                      # 4-bit tensors and the CPU output layer (every block with --block-size)
    block8: int                     # the CPU graph's 8-bit layer projections
    quant_method: QuantMethod | None  # None for float precisions
    # the request, kept so that another precision or the compact fallback resolves the same way
    block_size: int | None = None
    requested_method: str = "auto"
    calibration: bool = False
    kv_cache: KVForm = KVForm.CONCAT  # the portable graph's cache form (kv_cache_for); CPU graphs: concat

    # ------------------------------------------------------------------ resolution
    @classmethod
    def resolve(cls, *, precision: str, target: str, int4_recipe: str = Int4Recipe.ACCURATE,
                block_size: int | None = None, quant_method: str = "auto", calibration: bool = False,
                kv_cache: str | KVForm = KVForm.CONCAT) -> Recipe:
        """Validate the request and resolve the blocks and the quantization method.

        kv_cache: the portable graph's form, a KVForm or its --kv-cache word (concat, inplace).
        calibration: whether the build has text to calibrate on (a tokenizer): `auto` then picks
        AWQ (GPTQ for compact int4), else round-to-nearest. w8a8 always calibrates (SmoothQuant)."""
        prec = _choice(Precision, precision, "precision")
        tgt = _choice(Target, target, "export target")
        recipe = _choice(Int4Recipe, int4_recipe, "--int4-recipe")
        kv = KVForm.named(kv_cache)
        if kv is KVForm.INPLACE and tgt is not Target.PORTABLE:
            raise LlamaExportError("--kv-cache inplace is for GPU profiles; the CPU graph's GroupQueryAttention "
                                   "already updates its cache in place")
        if recipe is Int4Recipe.COMPACT and prec is not Precision.INT4:
            raise LlamaExportError("--int4-recipe compact applies to int4 only; add --precision int4")
        if block_size is not None and block_size not in BLOCK_SIZES:
            raise LlamaExportError(f"--block-size {block_size} is not supported; choose "
                                   f"{', '.join(map(str, BLOCK_SIZES[:-1]))} or {BLOCK_SIZES[-1]}")
        if quant_method not in QUANT_METHOD_CHOICES:
            raise LlamaExportError(f"unknown quantization method {quant_method!r}; choose "
                                   f"{', '.join(QUANT_METHOD_CHOICES[:-1])} or {QUANT_METHOD_CHOICES[-1]}")
        if prec is Precision.W8A8:
            if tgt is not Target.PORTABLE:
                raise LlamaExportError("w8a8 (SmoothQuant) is for TensorRT profiles; choose int8 for ONNX Runtime")
            if quant_method != "auto":
                raise LlamaExportError(f"--quant-method {quant_method} does not apply to w8a8, which is calibrated "
                                       "with SmoothQuant; leave --quant-method at auto")
        compact = recipe is Int4Recipe.COMPACT
        if block_size is not None:
            block = block8 = block_size
        else:
            block = COMPACT_BLOCK if compact and tgt is Target.ORT_CPU else DEFAULT_BLOCK
            block8 = CPU_8BIT_BLOCK
        if prec is Precision.W8A8:
            method = QuantMethod.SMOOTHQUANT
        elif prec not in (Precision.INT8, Precision.INT4):
            method = None
        elif quant_method == "auto":
            # int4: GPTQ rounding lowers the error on text it was not calibrated on; int8: AWQ's is as low
            # (docs/quantization.md, "Calibration that generalises")
            method = (QuantMethod.GPTQ if prec is Precision.INT4 else QuantMethod.AWQ) if calibration else QuantMethod.RTN
        else:
            method = QuantMethod(quant_method)
        return cls(prec, tgt, recipe if prec is Precision.INT4 else None, block, block8, method,
                   block_size, quant_method, calibration, kv)

    @classmethod
    def for_profile(cls, profile, precision: str, **request) -> Recipe:
        """The recipe for `precision` on `profile` (a profiles.Profile), which must support it."""
        if precision not in profile.precisions:
            raise LlamaExportError(f"precision {precision} is not supported by profile {profile.name}; "
                                   f"choose one of {', '.join(profile.precisions)}")
        return cls.resolve(precision=precision, target=Target.for_profile(profile), **request)

    @classmethod
    def candidates(cls, profile, precision: str = "auto", **request) -> list[Recipe]:
        """What a build may make: [the recipe asked for], or for `auto` one per precision the profile
        supports, most accurate first (w8a8 only when asked for by name)."""
        if precision != "auto":
            return [cls.for_profile(profile, precision, **request)]
        if request.get("int4_recipe", Int4Recipe.ACCURATE) != Int4Recipe.ACCURATE:
            raise LlamaExportError("--int4-recipe compact applies to int4 only; add --precision int4")
        return [cls.for_profile(profile, p, **request) for p in PREFERENCE if p in profile.precisions]

    @classmethod
    def every(cls, profile, **request) -> list[Recipe]:
        """One recipe per precision of the profile, w8a8 included (the `plan` table)."""
        order = PREFERENCE + EXPLICIT_ONLY
        return [cls.for_profile(profile, p, **request) for p in order if p in profile.precisions]

    def _request(self) -> dict:
        return dict(target=self.target, block_size=self.block_size, quant_method=self.requested_method,
                    calibration=self.calibration, kv_cache=self.kv_cache)

    def with_precision(self, precision: str) -> Recipe:
        """The same request at another precision (int4 recipes other than int4's are dropped)."""
        recipe = self.int4_recipe if precision == Precision.INT4 and self.int4_recipe else Int4Recipe.ACCURATE
        return Recipe.resolve(precision=precision, int4_recipe=recipe, **self._request())

    def as_compact(self) -> Recipe:
        """The compact int4 recipe of the same request: the planner's fallback when the accurate
        recipe's 8-bit projections do not fit the device."""
        return Recipe.resolve(precision=Precision.INT4, int4_recipe=Int4Recipe.COMPACT, **self._request())

    # ------------------------------------------------------------------ what it makes
    @property
    def compact(self) -> bool:
        return self.int4_recipe is Int4Recipe.COMPACT

    @property
    def quantized(self) -> bool:
        return self.precision not in (Precision.FP32, Precision.FP16)

    @property
    def cpu(self) -> bool:
        return self.target is Target.ORT_CPU

    @property
    def label(self) -> str:
        return "int4 (compact)" if self.compact else str(self.precision)

    @property
    def activation_dtype(self) -> str:
        """float32 for fp32 and every CPU graph; float16 for the portable graph's other precisions."""
        return "float32" if self.precision is Precision.FP32 or self.cpu else "float16"

    @property
    def activation_bytes(self) -> int:
        return 4 if self.activation_dtype == "float32" else 2

    @property
    def float_precision(self) -> str:
        """The precision name of the float tensors (embedding, output layer when not quantized)."""
        return "fp32" if self.activation_dtype == "float32" else "fp16"

    def fused_attention(self, cfg) -> bool:
        """ONNX Runtime CPU graphs use GroupQueryAttention (full rotary only: partial rotary keeps the
        portable attention). Such a graph takes no left padding and may share its KV buffers."""
        return self.cpu and cfg.rope_dim == cfg.head_dim

    @property
    def logits_keep_optional(self) -> bool:
        """Every graph takes a scalar int64 `num_logits_to_keep` (0 = every position, n = the last n):
        the runtime asks for the last position's logits only, so a prompt's prefill skips the output
        layer for the rest (and TensorRT copies [B, 1, V] to the host, not [B, S, V]). The CPU graph
        makes it optional (an initializer of the same name is its default 0; onnxruntime-genai leaves it
        out); the portable graph requires it, since TensorRT's ONNX parser treats a graph input that has
        an initializer as that constant (ModelImporter.cpp importInputs), and there it is a shape tensor
        (its value sizes the logits)."""
        return self.cpu

    @property
    def inplace_kv(self) -> bool:
        """The portable graph with a max-length cache written in place (KVForm.INPLACE)."""
        return self.target is Target.PORTABLE and self.kv_cache is KVForm.INPLACE

    def kv_form(self, cfg) -> KVForm:
        """The built graph's cache form (the manifest's kv_cache.form): in place for GroupQueryAttention (the
        CPU graph) and the portable graph's inplace cache, else concat."""
        return KVForm.INPLACE if self.fused_attention(cfg) or self.inplace_kv else KVForm.CONCAT

    @property
    def opset(self) -> int:
        return OPSET_INPLACE if self.inplace_kv else OPSET_CONCAT

    def graph_fields(self, cfg) -> dict:
        """The manifest's `graph`: the opset, how attention and the cache update are expressed, and the
        oldest TensorRT whose parser maps them (None for the CPU graph, which TensorRT does not run)."""
        if self.fused_attention(cfg):
            attention, update, trt = "GroupQueryAttention", "GroupQueryAttention", None
        elif self.inplace_kv:
            attention, update, trt = "Attention", "TensorScatter", "%d.%d" % INPLACE_MIN_TENSORRT
        else:
            attention, update, trt = "MatMul-Softmax-MatMul", "Concat", None if self.cpu else "10.0"
        return {"opset": self.opset, "attention": attention, "kv_update": update, "min_tensorrt": trt}

    @property
    def lm_head_precision(self) -> Precision | None:
        """The precision of the CPU graph's quantized copy of the output layer, or None (a float Gemm
        on the embedding table / output weight): 8-bit for int8 and int4, 4-bit for compact int4."""
        if not self.cpu or self.precision not in (Precision.INT8, Precision.INT4):
            return None
        return Precision.INT4 if self.compact else Precision.INT8

    def quantized_embedding(self, dim: int) -> bool:
        """CPU int8/int4 look tokens up in an 8-bit copy of the embedding table (GatherBlockQuantized,
        blocks of EMBED_BLOCK); their output layer is a separate quantized copy, so a tied table is
        not needed in float."""
        return self.lm_head_precision is not None and dim % EMBED_BLOCK == 0

    def tensor_precision(self, role: str) -> str:
        """The precision of one role's weights: qkv_proj, o_proj, gate_up_proj, down_proj or lm_head."""
        if role == LM_HEAD:
            return self.lm_head_precision or self.float_precision
        if self.precision is Precision.INT4 and not self.compact and role in INT4_8BIT_ROLES[self.target]:
            return Precision.INT8
        if self.precision is Precision.W8A8 and role not in W8A8_ACTIVATION_ROLES:
            return Precision.INT8
        return self.precision

    def quantized_input(self, role: str) -> bool:
        """w8a8: a static int8 QuantizeLinear/DequantizeLinear pair on this role's input."""
        return self.tensor_precision(role) == Precision.W8A8

    def form(self, role: str) -> QuantForm | None:
        """How one role's weights are stored, or None for float weights.

        CPU: MatMulNBits, 8-bit in blocks of block8 (the output layer: block), 4-bit in blocks of
        `block`; 8-bit symmetric (no zero points) in int8 models only, whose 8-bit tensors are all
        there is; int4 models' 8-bit tensors are there for accuracy and keep zero points.
        Portable: DequantizeLinear → MatMul, int8 per output channel, INT4 in blocks of `block`."""
        prec = self.tensor_precision(role)
        if prec in (Precision.FP32, Precision.FP16):
            return None
        bits = 4 if prec == Precision.INT4 else 8
        if self.cpu:
            block = self.block8 if bits == 8 and role != LM_HEAD else self.block
            return QuantForm(bits=bits, block=block, symmetric=bits == 8 and self.precision is Precision.INT8,
                             nbits=True)
        return QuantForm(bits=bits, block=self.block if bits == 4 else None, symmetric=True, nbits=False)

    @property
    def calibrated(self) -> bool:
        """Whether the export needs calibration ids (AWQ, GPTQ, SmoothQuant)."""
        return self.quant_method in (QuantMethod.AWQ, QuantMethod.GPTQ, QuantMethod.SMOOTHQUANT)

    @property
    def calibration_tokens(self) -> int:
        """How many calibration tokens the export runs: AWQ/GPTQ's statistics take 4096; SmoothQuant's
        range and clip search keeps 512 (on 4096 its KL rose by a third: docs/quantization.md)."""
        from llamaexport.build.awq import CALIBRATION_TOKENS, SMOOTHQUANT_TOKENS

        return SMOOTHQUANT_TOKENS if self.quant_method is QuantMethod.SMOOTHQUANT else CALIBRATION_TOKENS

    @property
    def quantization(self) -> str | None:
        """The manifest's `quantization` string."""
        if self.quant_method is None:
            return None
        return "awq+gptq" if self.quant_method is QuantMethod.GPTQ else str(self.quant_method)

    # ------------------------------------------------------------------ manifest
    def tensor_blocks(self) -> dict | None:
        """The CPU graph's MatMulNBits block of each quantized role, or None."""
        if not self.cpu or self.precision not in (Precision.INT8, Precision.INT4):
            return None
        return {role: form.block for role in (*ROLES.values(), LM_HEAD) if (form := self.form(role)) is not None}

    def manifest_fields(self, cfg) -> dict:
        """The fields of manifest.json that describe what this recipe built."""
        left_padding = not self.fused_attention(cfg)
        return {
            "precision": str(self.precision),
            "export_target": str(self.target),
            # GroupQueryAttention (the fused CPU attention) does not take left-padded rows
            "left_padding": left_padding,
            "block_size": self.block if self.precision in (Precision.INT8, Precision.INT4) else None,
            "tensor_blocks": self.tensor_blocks(),
            "quantization": self.quantization,
            "tensor_precisions": {**{r: str(self.tensor_precision(r)) for r in ROLES.values()},
                                  LM_HEAD: str(self.tensor_precision(LM_HEAD)),
                                  "embedding": "int8" if self.quantized_embedding(cfg.dim) else self.float_precision},
            # KVForm.INPLACE: the same max-length buffer may be bound as past and present
            # (GroupQueryAttention, or TensorScatter, writes the new entries in place); plain past/present
            # (a max-length past, a fresh present) works too
            "kv_cache": {"form": self.kv_form(cfg).value,
                         "dtype": self.activation_dtype},
            "graph": self.graph_fields(cfg),
        }
