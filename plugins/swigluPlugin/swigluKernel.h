/*
 * SwiGLU launcher: y[r, f] = silu(x[r, f]) * x[r, F + f], silu(g) = g * sigmoid(g).
 *
 *   x [rows, 2F]   dtype (fp32 / fp16 / bf16), contiguous (rows = product of the leading dims)
 *   y [rows, F]    same dtype; must not overlap x
 *
 * Math in fp32.
 */
#pragma once

#include "../common/kernelTypes.h"

#include <cuda_runtime_api.h>

namespace llamaexport
{

//! Enqueues the SwiGLU kernel on `stream` (one launch). Returns cudaErrorInvalidValue for bad
//! arguments, else the launch status.
cudaError_t swigluLaunch(cudaStream_t stream, void const* x, void* y, DType type, int64_t rows, int32_t ffnDim);

} // namespace llamaexport
