/*
 * Plain C entry points to the launchers, for callers without C++ or TensorRT: the pytest GPU tier
 * and scripts/gpu_kernels.py load them with ctypes and pass torch data_ptr()s.
 * Every function returns a cudaError_t as int (0 = success); llamaexport_error_string names it.
 * dtype codes: 0 = fp32, 1 = fp16, 2 = bf16 (llamaexport::DType).
 */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLAMAEXPORT_C_API __attribute__((visibility("default")))

//! RoPE on x [B, H, S, head_dim] with cos/sin [table_batch, S, rotary_dim/2] into y.
LLAMAEXPORT_C_API int llamaexport_rope(void* stream, void const* x, void const* cos, void const* sin, void* y,
    int x_dtype, int table_dtype, int batch, int heads, int seq, int head_dim, int rotary_dim, int table_batch,
    int interleaved);

//! SwiGLU on x [rows, 2*ffn_dim] into y [rows, ffn_dim].
LLAMAEXPORT_C_API int llamaexport_swiglu(void* stream, void const* x, void* y, int dtype, int64_t rows, int ffn_dim);

LLAMAEXPORT_C_API char const* llamaexport_error_string(int code);

#ifdef __cplusplus
}
#endif
