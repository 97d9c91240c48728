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


def int8_per_channel(w_t: np.ndarray):
    """w_t [K, N] float32 -> (q int8 [K, N], scale float32 [N]); w ~ q * scale."""
    amax = np.abs(w_t).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w_t / scale), -127, 127).astype(np.int8)
    return q, scale


def int4_blockwise(w_t: np.ndarray, block: int):
    """w_t [K, N] -> (q int8 values in [-8, 7] [K, N], scale float32 [K/block, N]), symmetric."""
    K, N = w_t.shape
    if K % block:
        raise ValueError(f"K={K} is not a multiple of the block size {block}")
    wb = w_t.reshape(K // block, block, N)
    amax = np.abs(wb).max(axis=1)  # [K/block, N]
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(wb / scale[:, None, :]), -8, 7).astype(np.int8)
    return q.reshape(K, N), scale


def pack_int4(q: np.ndarray) -> bytes:
    """Signed 4-bit values (flattened, row-major) -> ONNX INT4 raw bytes, low nibble first."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def matmul_nbits(w_t: np.ndarray, *, bits: int, block: int):
    """w_t [K, N] -> MatMulNBits tensors (B uint8 [N, n_blocks, block*bits/8], scales float32
    [N * n_blocks], zero_points uint8) using asymmetric min/max quantization per block of K.
    K is zero-padded to a multiple of `block`."""
    K, N = w_t.shape
    nb = -(-K // block)
    w = np.zeros((nb * block, N), np.float32)
    w[:K] = w_t
    wb = w.T.reshape(N, nb, block)                     # [N, blocks, block]
    qmax = (1 << bits) - 1
    lo = np.minimum(wb.min(axis=2), 0.0)               # the range always holds 0 exactly
    hi = np.maximum(wb.max(axis=2), 0.0)
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.uint8)    # [N, blocks]
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
