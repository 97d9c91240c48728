"""Weight quantization in numpy: the arithmetic behind the precisions that live in the graph.

Two graph forms consume these:
  - portable (TensorRT, any ONNX runtime): DequantizeLinear feeding a MatMul;
      int8: per-output-channel symmetric, int8 [K, N] with scale [N] (axis 1);
      int4: block-wise symmetric along K, INT4 [K, N] with scale [K/block, N] (axis 0, block_size).
  - ONNX Runtime CPU: com.microsoft MatMulNBits (bits 8 or 4, block-wise along K, uint8 blobs
    with an explicit zero point per block), which runs int8 dot products (accuracy_level 4).

Quantization runs tensor by tensor inside the streaming export, so memory stays bounded by
one layer (onnxruntime.quantization's quantizers load the whole model, which a 7B model in
4 GB cannot afford).
"""

from __future__ import annotations

import numpy as np


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def _symmetric(wg: np.ndarray, qmin: int, qmax: int, axis: int):
    """Symmetric quantization of groups along `axis`, with the scale chosen per group among
    clipped ranges (amax * r) to minimise the squared error (outliers otherwise waste the grid)."""
    amax = np.abs(wg).max(axis=axis, keepdims=True)
    best_err, best_scale = None, None
    for r in CLIP_RATIOS:
        scale = np.where(amax > 0, amax * r / qmax, 1.0).astype(np.float32)
        err = ((np.clip(np.rint(wg / scale), qmin, qmax) * scale - wg) ** 2).sum(axis=axis, keepdims=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = np.where(better, err, best_err), np.where(better, scale, best_scale)
    q = np.clip(np.rint(wg / best_scale), qmin, qmax).astype(np.int8)
    return q, np.squeeze(best_scale, axis=axis)


def int8_per_channel(w_t: np.ndarray):
    """w_t [K, N] float32 -> (q int8 [K, N], scale float32 [N]); w ~ q * scale."""
    step = max(1, CHUNK_ELEMENTS // w_t.shape[0])
    parts = [_symmetric(w_t[:, i:i + step], -127, 127, axis=0) for i in range(0, w_t.shape[1], step)]
    return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts])


def int4_blockwise(w_t: np.ndarray, block: int):
    """w_t [K, N] -> (q int8 values in [-8, 7] [K, N], scale float32 [K/block, N]), symmetric."""
    K, N = w_t.shape
    if K % block:
        raise ValueError(f"K={K} is not a multiple of the block size {block}")
    step = max(1, CHUNK_ELEMENTS // K)
    parts = [_symmetric(w_t[:, i:i + step].reshape(K // block, block, -1), -8, 7, axis=1) for i in range(0, N, step)]
    q = np.concatenate([p[0] for p in parts], axis=2)
    return q.reshape(K, N), np.concatenate([p[1] for p in parts], axis=1)


def pack_int4(q: np.ndarray) -> bytes:
    """Signed 4-bit values (flattened, row-major) -> ONNX INT4 raw bytes, low nibble first."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


CHUNK_ELEMENTS = 1 << 24  # quantize in column chunks so temporaries stay ~64 MB whatever the matrix


def matmul_nbits(w_t: np.ndarray, *, bits: int, block: int):
    """w_t [K, N] -> MatMulNBits tensors (B uint8 [N, n_blocks, block*bits/8], scales float32
    [N * n_blocks], zero_points uint8) using asymmetric min/max quantization per block of K.
    K is zero-padded to a multiple of `block`."""
    K, N = w_t.shape
    step = max(1, CHUNK_ELEMENTS // K)
    if N > step:  # output columns are independent: do them a chunk at a time
        parts = [_matmul_nbits(w_t[:, i:i + step], bits=bits, block=block) for i in range(0, N, step)]
        blob = np.concatenate([p[0] for p in parts])
        scale = np.concatenate([p[1] for p in parts])
        # zero points are packed per column (padded to whole bytes), so chunks concatenate
        return blob, scale, np.concatenate([p[2] for p in parts])
    return _matmul_nbits(w_t, bits=bits, block=block)


def _matmul_nbits(w_t: np.ndarray, *, bits: int, block: int):
    K, N = w_t.shape
    nb = -(-K // block)
    w = np.zeros((nb * block, N), np.float32)
    w[:K] = w_t
    wb = w.T.reshape(N, nb, block)                     # [N, blocks, block]
    qmax = (1 << bits) - 1
    lo0 = np.minimum(wb.min(axis=2), 0.0)              # the range always holds 0 exactly
    hi0 = np.maximum(wb.max(axis=2), 0.0)
    best = None
    for r in CLIP_RATIOS:  # per block, the clipped range with the least squared error
        scale = np.where(hi0 > lo0, (hi0 - lo0) * r / qmax, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-lo0 * r / scale), 0, qmax)
        q = np.clip(np.rint(wb / scale[..., None]) + zp[..., None], 0, qmax)
        err = (((q - zp[..., None]) * scale[..., None] - wb) ** 2).sum(axis=2)
        if best is None:
            best = [err, scale, zp]
        else:
            m = err < best[0]
            best = [np.where(m, err, best[0]), np.where(m, scale, best[1]), np.where(m, zp, best[2])]
    _, scale, zp = best
    zp = zp.astype(np.uint8)
    q = np.clip(np.rint(wb / scale[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
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
    return np.ascontiguousarray(blob), scale.reshape(-1), np.ascontiguousarray(zpk)


def dequant_matmul_nbits(blob, scale, zp, *, K: int, N: int, bits: int, block: int) -> np.ndarray:
    """The inverse of `matmul_nbits` -> w_t [K, N] (used by tests and the planner's error report)."""
    nb = -(-K // block)
    if bits == 8:
        q, z = blob.astype(np.float32), zp.reshape(N, nb).astype(np.float32)
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


def fake_quant(w_t: np.ndarray, *, precision: str, target: str, block: int) -> np.ndarray:
    """Quantize and dequantize w_t [K, N] exactly as the export would (for AWQ's search)."""
    K, N = w_t.shape
    if precision in ("fp32", "fp16"):
        return w_t
    if target == "ort-cpu":
        bits = 8 if precision == "int8" else 4
        blob, scale, zp = matmul_nbits(w_t, bits=bits, block=block)
        return dequant_matmul_nbits(blob, scale, zp, K=K, N=N, bits=bits, block=block)
    b = portable_int4_block(K, block) if precision == "int4" else None
    if b is not None:
        q, scale = int4_blockwise(w_t, b)
        return (q.reshape(K // b, b, N) * scale[:, None, :]).reshape(K, N)
    q, scale = int8_per_channel(w_t)
    return q * scale
