/*
 * Rotary position embedding (RoPE) launcher.
 *
 *   x   [B, H, S, headDim]        dtype xType (fp32 / fp16 / bf16), contiguous
 *   cos [Bt, S, rotaryDim / 2]    dtype tableType (xType or fp32), Bt = B or 1 (broadcast)
 *   sin [Bt, S, rotaryDim / 2]    same as cos
 *   y   [B, H, S, headDim]        dtype xType; must not overlap x (TensorRT never aliases them)
 *
 * interleaved: rotate pairs (2j, 2j+1) with cos[j] / sin[j] (Meta layout);
 * otherwise rotate pairs (j, j + rotaryDim/2) (HF "rotate_half" layout).
 * Dims >= rotaryDim pass through. Math in fp32.
 */
#pragma once

#include "../common/kernelTypes.h"

#include <cuda_runtime_api.h>

namespace llamaexport
{

struct RopeShape
{
    int32_t batch;      //!< B
    int32_t heads;      //!< H
    int32_t seq;        //!< S
    int32_t headDim;    //!< hd
    int32_t rotaryDim;  //!< rd: even, 2 <= rd <= hd
    int32_t tableBatch; //!< leading dim of cos/sin: B, or 1 to broadcast over the batch
};

//! Enqueues the RoPE kernel on `stream` (one launch). Returns cudaErrorInvalidValue for bad
//! arguments, else the launch status.
cudaError_t ropeLaunch(cudaStream_t stream, void const* x, void const* cos, void const* sin, void* y, DType xType,
    DType tableType, RopeShape const& shape, bool interleaved);

} // namespace llamaexport
