"""Weight quantization in numpy: the arithmetic behind the precisions that live in the graph.

Two graph forms consume these:
  - portable (TensorRT, any ONNX runtime): DequantizeLinear feeding a MatMul;
      int8: per-output-channel symmetric, int8 [K, N] with scale [N] (axis 1);
      int4: block-wise symmetric along K, INT4 [K, N] with scale [K/block, N] (axis 0, block_size).
  - ONNX Runtime CPU: com.microsoft MatMulNBits (bits 8 or 4, block-wise along K, uint8 blobs
    with a zero point per block, or none for symmetric 8-bit weights), which runs int8 dot
    products (accuracy_level 4) and so also rounds its input to int8 per block of K.
A `QuantForm` says which of these one tensor gets; the rules that choose it live in recipe.py.

Rounding: importance-weighted round-to-nearest with a searched clip per block (_symmetric,
_block_params), or GPTQ (_gptq) given the calibration inputs' second moment; both produce the
same tensors, so the graph does not know which ran.

Quantization runs tensor by tensor inside the streaming export, so memory stays bounded by
one layer (onnxruntime.quantization's quantizers load the whole model, which a 7B model in
4 GB cannot afford).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class QuantForm:
    """How one weight tensor is stored (chosen per role by recipe.Recipe.form)."""

    bits: int               # 8 or 4
    block: int | None       # block along K (MatMulNBits, portable INT4); None: int8 per output channel
    symmetric: bool         # no zero points (MatMulNBits' default 128 for 8-bit); the portable forms always are
    nbits: bool             # ONNX Runtime CPU MatMulNBits layout, else portable DequantizeLinear -> MatMul


CLIP_RATIOS = tuple(np.linspace(1.0, 0.6, 11))

# The portable graph stores its DequantizeLinear scales in fp16 (recipe: every quantized portable
# precision has fp16 activations), and TensorRT's ONNX parser refuses a zero scale ("Scale
# coefficients must all be positive"). A row or block of tiny weights would have a scale below
# fp16's range that rounds to 0 (or to a subnormal), so every portable scale is at least fp16's
# smallest positive normal, 2^-14. The codes are rounded with the clamped scale, so they stay
# consistent with it: such a group is then quantized on a coarser grid than its range allows, with
# an absolute error of at most 2^-15 per weight.
MIN_FP16_SCALE = float(np.finfo(np.float16).tiny)  # 6.1035e-05

# Importance weights (`imp`, one per input channel K): the mean square of the input that multiplies
# each weight row, from calibration text. The scale search then minimises sum_k imp_k (w_k - q_k)^2,
# the expected output error, instead of the plain weight error (llama.cpp's imatrix does the same).
# None = all channels equal.


def _symmetric(wg: np.ndarray, qmin: int, qmax: int, axis: int, imp: np.ndarray | None = None,
               min_scale: float = 0.0):
    """Symmetric quantization of groups along `axis`, with the scale chosen per group among
    clipped ranges (amax * r) to minimise the (importance-weighted) squared error (outliers
    otherwise waste the grid). imp broadcasts against wg. Every scale is at least min_scale, and
    the codes are rounded with the scale as clamped."""
    amax = np.abs(wg).max(axis=axis, keepdims=True)
    best_err, best_scale = None, None
    for r in CLIP_RATIOS:
        scale = np.maximum(np.where(amax > 0, amax * r / qmax, 1.0), min_scale).astype(np.float32)
        d2 = (np.clip(np.rint(wg / scale), qmin, qmax) * scale - wg) ** 2
        err = (d2 if imp is None else d2 * imp).sum(axis=axis, keepdims=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = np.where(better, err, best_err), np.where(better, scale, best_scale)
    q = np.clip(np.rint(wg / best_scale), qmin, qmax).astype(np.int8)
    return q, np.squeeze(best_scale, axis=axis)


def _imp_column(imp: np.ndarray | None, K: int) -> np.ndarray | None:
    return None if imp is None else np.asarray(imp, np.float32).reshape(K, 1)


def int8_per_channel(w_t: np.ndarray, imp: np.ndarray | None = None, *, min_scale: float = 0.0):
    """w_t [K, N] float32 -> (q int8 [K, N], scale float32 [N] >= min_scale); w ~ q * scale."""
    step = max(1, CHUNK_ELEMENTS // w_t.shape[0])
    ic = _imp_column(imp, w_t.shape[0])
    parts = [_symmetric(w_t[:, i:i + step], -127, 127, axis=0, imp=ic, min_scale=min_scale)
             for i in range(0, w_t.shape[1], step)]
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts])


def int4_blockwise(w_t: np.ndarray, block: int, imp: np.ndarray | None = None, *, min_scale: float = 0.0):
    """w_t [K, N] -> (q int8 values in [-8, 7] [K, N], scale float32 [K/block, N] >= min_scale), symmetric."""
    K, N = w_t.shape
    if K % block:
        raise ValueError(f"K={K} is not a multiple of the block size {block}")
    step = max(1, CHUNK_ELEMENTS // K)
    ib = None if imp is None else np.asarray(imp, np.float32).reshape(K // block, block, 1)
    parts = [_symmetric(w_t[:, i:i + step].reshape(K // block, block, -1), -8, 7, axis=1, imp=ib, min_scale=min_scale)
             for i in range(0, N, step)]
    q = np.concatenate([p[0] for p in parts], axis=2)
    return q.reshape(K, N), np.concatenate([p[1] for p in parts], axis=1)


def pack_int4(q: np.ndarray) -> bytes:
    """Signed 4-bit values (flattened, row-major) -> ONNX INT4 raw bytes, low nibble first."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


CHUNK_ELEMENTS = 1 << 24  # quantize in column chunks so temporaries stay ~64 MB whatever the matrix


def matmul_nbits(w_t: np.ndarray, *, bits: int, block: int, imp: np.ndarray | None = None,
                 symmetric: bool = False):
    """w_t [K, N] -> MatMulNBits tensors (B uint8 [N, n_blocks, block*bits/8], scales float32
    [N * n_blocks], zero_points uint8) using asymmetric min/max quantization per block of K.
    K is zero-padded to a multiple of `block`. symmetric (8 bits only): absmax scales in
    [-127, 127] and zero_points None (MatMulNBits' default zero point, 128)."""
    K, N = w_t.shape
    step = max(1, CHUNK_ELEMENTS // K)
    if N > step:  # output columns are independent: do them a chunk at a time
        parts = [_matmul_nbits(w_t[:, i:i + step], bits=bits, block=block, imp=imp, symmetric=symmetric)
                 for i in range(0, N, step)]
        blob = np.concatenate([p[0] for p in parts])
        scale = np.concatenate([p[1] for p in parts])
        # zero points are packed per column (padded to whole bytes), so chunks concatenate
        return blob, scale, None if symmetric else np.concatenate([p[2] for p in parts])
    return _matmul_nbits(w_t, bits=bits, block=block, imp=imp, symmetric=symmetric)


def _matmul_nbits(w_t: np.ndarray, *, bits: int, block: int, imp: np.ndarray | None = None,
                  symmetric: bool = False):
    K, N = w_t.shape
    nb = -(-K // block)
    w = np.zeros((nb * block, N), np.float32)
    w[:K] = w_t
    wb = w.T.reshape(N, nb, block)                     # [N, blocks, block]
    ib = None
    if imp is not None:
        ib = np.zeros(nb * block, np.float32)
        ib[:K] = imp
        ib = ib.reshape(1, nb, block)
    scale, zp = _block_params(wb, ib, bits, symmetric)
    return _pack_nbits(_round(wb, scale, zp, bits), scale, zp, bits)


def _block_params(wb: np.ndarray, ib: np.ndarray | None, bits: int, symmetric: bool):
    """wb [N, blocks, block] -> (scale float32 [N, blocks], zero point [N, blocks] as float
    integers, or None when symmetric): per block, the clipped range with the least
    (importance-weighted, ib broadcasting against wb) squared error."""
    if symmetric:
        if bits != 8:
            raise ValueError("symmetric MatMulNBits weights are 8-bit only")
        _, scale = _symmetric(wb, -127, 127, axis=2, imp=ib)
        return scale.astype(np.float32), None
    qmax = (1 << bits) - 1
    lo0 = np.minimum(wb.min(axis=2), 0.0)              # the range always holds 0 exactly
    hi0 = np.maximum(wb.max(axis=2), 0.0)
    best = None
    for r in CLIP_RATIOS:
        scale = np.where(hi0 > lo0, (hi0 - lo0) * r / qmax, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-lo0 * r / scale), 0, qmax)
        q = np.clip(np.rint(wb / scale[..., None]) + zp[..., None], 0, qmax)
        d2 = ((q - zp[..., None]) * scale[..., None] - wb) ** 2
        err = (d2 if ib is None else d2 * ib).sum(axis=2)
        if best is None:
            best = [err, scale, zp]
        else:
            m = err < best[0]
            best = [np.where(m, err, best[0]), np.where(m, scale, best[1]), np.where(m, zp, best[2])]
    return best[1], best[2]


def _round(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int) -> np.ndarray:
    """The stored unsigned codes of w under (scale, zp) (broadcast over w's last axis)."""
    if zp is None:  # symmetric 8-bit: codes q + 128
        return (np.clip(np.rint(w / scale[..., None]), -127, 127) + 128).astype(np.uint8)
    return np.clip(np.rint(w / scale[..., None]) + zp[..., None], 0, (1 << bits) - 1).astype(np.uint8)


def _pack_nbits(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, bits: int):
    """codes q uint8 [N, blocks, block], scale/zp [N, blocks] -> MatMulNBits (blob, scales, zero_points)."""
    N, nb, _ = q.shape
    if zp is None:
        return np.ascontiguousarray(q), scale.reshape(-1).astype(np.float32), None
    zp = zp.astype(np.uint8)
    if bits == 8:
        blob, zpk = q, zp.reshape(-1)
    elif bits == 4:
        blob = q[..., 0::2] | (q[..., 1::2] << 4)      # [N, blocks, block/2]
        zflat = zp.reshape(N, nb)
        if nb % 2:                                      # zero points pack per column, padded
            zflat = np.concatenate([zflat, np.zeros((N, 1), np.uint8)], axis=1)
        zpk = (zflat[:, 0::2] | (zflat[:, 1::2] << 4)).reshape(-1)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return np.ascontiguousarray(blob), scale.reshape(-1).astype(np.float32), np.ascontiguousarray(zpk)


# GPTQ's dampening, as a fraction of the mean diagonal of the Hessian (see _gptq): with fewer calibration
# tokens than input channels E[x x^T] is rank-deficient and needs DAMP; with at least as many, DAMP_FULL_RANK
DAMP = 1.0
DAMP_FULL_RANK = 0.1


def gptq_damp(tokens: int, K: int) -> float:
    """The dampening of a Hessian estimated from `tokens` calibration rows of K input channels."""
    return DAMP_FULL_RANK if tokens >= K else DAMP


def _gptq(w_t: np.ndarray, hessian: np.ndarray, *, group: int, choose, qmin: int, qmax: int,
          damp: float = DAMP, lazy: int = 128):
    """GPTQ (Frantar et al. 2022) on w_t [K, N]: the input channels k are rounded in order and
    each one's rounding error is spread over the channels not yet rounded through the inverse of
    hessian = E[x x^T] [K, K] of the calibration inputs, so that the output error X (W_q - W),
    not the weight error, is minimised. Each group of `group` channels gets its scale (and zero
    point) from choose(w [N, 1, group], imp [1, 1, group]) -> (scale [N, 1], zp [N, 1] or None)
    when its first channel is reached, from the weights as updated so far. K must be a multiple
    of group. Returns (codes int16 [N, K] in [qmin, qmax], scale [N, K/group], zp or None) with
    w ~ (code - zp) * scale.

    damp: added to the diagonal as a fraction of its mean (gptq_damp). With fewer calibration tokens
    than K the Hessian is rank-deficient, and at the paper's 1% GPTQ fits the calibration text
    instead of lowering the error on other text; with more, 10% generalises (docs/quantization.md).
    The damped matrix is well conditioned, so float32 suffices: three K x K float32 matrices at
    the peak."""
    K, N = w_t.shape
    if K % group:
        raise ValueError(f"K={K} is not a multiple of the group {group}")
    lazy = max(1, lazy // group) * group if group <= lazy else lazy
    if group > lazy and group != K and group % lazy:
        # a group would start inside a lazy batch, before that batch's updates reach its columns
        raise ValueError(f"group {group} must be a multiple of the lazy batch {lazy}")
    W = np.array(w_t.T, dtype=np.float32, order="C")   # [N, K]: a copy (w_t may be a view of it), updated in place
    H = np.array(hessian, np.float32)
    d = np.diag(H).copy()
    dead = d <= 0                                        # channels the calibration never feeds
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(K)] += np.float32(damp * float(d[~dead].mean() if (~dead).any() else 1.0))
    H = np.linalg.inv(H)
    L = np.linalg.cholesky(H)
    del H
    U = np.ascontiguousarray(L.T)                        # the upper Cholesky factor of H^-1
    del L
    imp = np.where(dead, 0.0, d).astype(np.float32)
    ng = K // group
    codes = np.empty((N, K), np.int16)
    scale = np.empty((N, ng), np.float32)
    zp = None
    for i1 in range(0, K, lazy):
        i2 = min(i1 + lazy, K)
        W1 = W[:, i1:i2]
        E1 = np.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            k = i1 + j
            if k % group == 0:
                gi = k // group
                s, z = choose(W[:, None, k:k + group], imp[None, None, k:k + group])
                scale[:, gi] = s.reshape(N)
                if z is not None:
                    if zp is None:
                        zp = np.empty((N, ng), np.float32)
                    zp[:, gi] = z.reshape(N)
                sg, zg = scale[:, gi], (0.0 if z is None else zp[:, gi])
            w = W1[:, j]
            q = np.clip(np.rint(w / sg) + zg, qmin, qmax)
            codes[:, k] = q
            err = (w - (q - zg) * sg) / U1[j, j]
            W1[:, j + 1:] -= np.outer(err, U1[j, j + 1:])
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes, scale, zp


def _padded(w_t: np.ndarray, hessian: np.ndarray, Kp: int):
    K = w_t.shape[0]
    if Kp == K:
        return w_t, hessian
    w = np.zeros((Kp, w_t.shape[1]), np.float32)
    w[:K] = w_t
    h = np.zeros((Kp, Kp), np.float32)  # _gptq works in float32
    h[:K, :K] = hessian
    return w, h


def gptq_matmul_nbits(w_t: np.ndarray, hessian: np.ndarray, *, bits: int, block: int, symmetric: bool = False,
                      damp: float = DAMP):
    """matmul_nbits' tensors with GPTQ rounding (_gptq; each block's scale and zero point are
    chosen as matmul_nbits chooses them, with importance diag(hessian))."""
    K, N = w_t.shape
    nb = -(-K // block)
    w, h = _padded(w_t, hessian, nb * block)

    def choose(wg, ig):
        return _block_params(wg, ig, bits, symmetric)

    if symmetric:
        if bits != 8:
            raise ValueError("symmetric MatMulNBits weights are 8-bit only")
        codes, scale, _ = _gptq(w, h, group=block, choose=choose, qmin=-127, qmax=127, damp=damp)
        return _pack_nbits((codes + 128).astype(np.uint8).reshape(N, nb, block), scale, None, bits)
    codes, scale, zp = _gptq(w, h, group=block, choose=choose, qmin=0, qmax=(1 << bits) - 1, damp=damp)
    return _pack_nbits(codes.astype(np.uint8).reshape(N, nb, block), scale, zp, bits)


def gptq_int4_blockwise(w_t: np.ndarray, hessian: np.ndarray, block: int, *, min_scale: float = 0.0,
                        damp: float = DAMP):
    """int4_blockwise's tensors (q [K, N] in [-8, 7], scale [K/block, N]) with GPTQ rounding."""
    codes, scale, _ = _gptq(w_t, hessian, group=block, qmin=-8, qmax=7, damp=damp,
                            choose=lambda wg, ig: (_symmetric(wg, -8, 7, axis=2, imp=ig, min_scale=min_scale)[1], None))
    return codes.T.astype(np.int8), scale.T.copy()


def gptq_int8_per_channel(w_t: np.ndarray, hessian: np.ndarray, *, min_scale: float = 0.0, damp: float = DAMP):
    """int8_per_channel's tensors (q [K, N], scale [N]) with GPTQ rounding (one group: the scale
    is chosen from the whole row before any update)."""
    K = w_t.shape[0]
    codes, scale, _ = _gptq(w_t, hessian, group=K, qmin=-127, qmax=127, damp=damp,
                            choose=lambda wg, ig: (_symmetric(wg, -127, 127, axis=2, imp=ig, min_scale=min_scale)[1],
                                                   None))
    return codes.T.astype(np.int8), scale.reshape(-1).copy()


def nbits_tensors(w_t: np.ndarray, form: QuantForm, *, imp: np.ndarray | None = None,
                  hessian: np.ndarray | None = None, damp: float = DAMP):
    """The ONNX Runtime CPU graph's MatMulNBits tensors of w_t [K, N] in `form` -> (blob, scales,
    zero_points or None). hessian: GPTQ rounding (_gptq, with `damp`) instead of importance-weighted rounding."""
    if hessian is not None:
        return gptq_matmul_nbits(w_t, hessian, bits=form.bits, block=form.block, symmetric=form.symmetric, damp=damp)
    return matmul_nbits(w_t, bits=form.bits, block=form.block, imp=imp, symmetric=form.symmetric)


def portable_tensors(w_t: np.ndarray, form: QuantForm, *, imp: np.ndarray | None = None,
                     hessian: np.ndarray | None = None, damp: float = DAMP):
    """The portable graph's DequantizeLinear tensors of w_t [K, N] in `form` -> (q, scale, block):
    INT4 values [K, N] with scale [K/block, N] (block-wise along K), or, for 8-bit forms and 4-bit
    ones whose K no block divides, int8 [K, N] with scale [N] per output channel (block None).
    Every scale is >= MIN_FP16_SCALE and q is rounded with it (see MIN_FP16_SCALE)."""
    block = portable_int4_block(w_t.shape[0], form.block) if form.bits == 4 else None
    lo = MIN_FP16_SCALE
    if block is not None:
        q, scale = (int4_blockwise(w_t, block, imp, min_scale=lo) if hessian is None
                    else gptq_int4_blockwise(w_t, hessian, block, min_scale=lo, damp=damp))
    else:
        q, scale = (int8_per_channel(w_t, imp, min_scale=lo) if hessian is None
                    else gptq_int8_per_channel(w_t, hessian, min_scale=lo, damp=damp))
    return q, scale, block


def activation_scale(amax: float, qmax: int = 127) -> float:
    """The static per-tensor scale of a QuantizeLinear on activations whose range is amax (w8a8's
    input Q/DQ pairs), clamped like the weights' (MIN_FP16_SCALE): the graph stores it in fp16."""
    return max(float(amax) / qmax, MIN_FP16_SCALE)


def dequant_matmul_nbits(blob, scale, zp, *, K: int, N: int, bits: int, block: int) -> np.ndarray:
    """The inverse of `matmul_nbits` -> w_t [K, N] (for the bias correction, fake_quant and tests)."""
    nb = -(-K // block)
    if bits == 8:
        q = blob.astype(np.float32)
        z = np.full((N, nb), 128, np.float32) if zp is None else zp.reshape(N, nb).astype(np.float32)
    else:
        q = np.empty((N, nb, block), np.float32)
        q[..., 0::2], q[..., 1::2] = blob & 0xF, blob >> 4
        zz = np.empty((N, (nb + 1) // 2 * 2), np.float32)
        zr = zp.reshape(N, -1)
        zz[:, 0::2], zz[:, 1::2] = zr & 0xF, zr >> 4
        z = zz[:, :nb]
    w = (q - z[..., None]) * scale.reshape(N, nb)[..., None]
    return w.reshape(N, nb * block)[:, :K].T


def portable_int4_block(K: int, block: int) -> int | None:
    """The block for portable INT4 along K: the requested one if it divides K, else the largest
    of 128/64/32 that does; None means this tensor falls back to per-channel int8."""
    return next((b for b in (block, 128, 64, 32) if K % b == 0), None)


def fake_quant_act_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """What MatMulNBits at accuracy_level 4 multiplies instead of x [N, K]: each row's blocks of
    `block` along K rounded to int8 with a symmetric scale amax / 127 (round to nearest; the last
    block zero-padded). Matches ONNX Runtime's CPU output to float rounding (test_quantize)."""
    N, K = x.shape
    nb = -(-K // block)
    xb = np.zeros((N, nb * block), np.float32)
    xb[:, :K] = x
    xb = xb.reshape(N, nb, block)
    scale = np.abs(xb).max(axis=2, keepdims=True) / np.float32(127)
    q = np.rint(xb / np.where(scale > 0, scale, 1)).clip(-127, 127)
    return (q * scale).reshape(N, nb * block)[:, :K]


def fake_quant(w_t: np.ndarray, form: QuantForm, *, imp: np.ndarray | None = None) -> np.ndarray:
    """Quantize and dequantize w_t [K, N] exactly as the export stores it in `form` (for AWQ's
    search and the bias correction)."""
    K, N = w_t.shape
    if form.nbits:
        blob, scale, zp = nbits_tensors(w_t, form, imp=imp)
        return dequant_matmul_nbits(blob, scale, zp, K=K, N=N, bits=form.bits, block=form.block)
    q, scale, block = portable_tensors(w_t, form, imp=imp)
    if block is not None:
        return (q.reshape(K // block, block, N) * scale[:, None, :]).reshape(K, N)
    return q * scale
