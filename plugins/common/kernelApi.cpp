#include "kernelApi.h"

#include "../ropePlugin/ropeKernel.h"
#include "../swigluPlugin/swigluKernel.h"

#include <cuda_runtime_api.h>

using llamaexport::DType;

namespace
{
bool validDType(int t)
{
    return t == 0 || t == 1 || t == 2;
}
} // namespace

extern "C" int llamaexport_rope(void* stream, void const* x, void const* cos, void const* sin, void* y, int x_dtype,
    int table_dtype, int batch, int heads, int seq, int head_dim, int rotary_dim, int table_batch, int interleaved)
{
    if (!validDType(x_dtype) || !validDType(table_dtype))
    {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    llamaexport::RopeShape const shape{batch, heads, seq, head_dim, rotary_dim, table_batch};
    return static_cast<int>(llamaexport::ropeLaunch(static_cast<cudaStream_t>(stream), x, cos, sin, y,
        static_cast<DType>(x_dtype), static_cast<DType>(table_dtype), shape, interleaved != 0));
}

extern "C" int llamaexport_swiglu(void* stream, void const* x, void* y, int dtype, int64_t rows, int ffn_dim)
{
    if (!validDType(dtype))
    {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    return static_cast<int>(
        llamaexport::swigluLaunch(static_cast<cudaStream_t>(stream), x, y, static_cast<DType>(dtype), rows, ffn_dim));
}

extern "C" char const* llamaexport_error_string(int code)
{
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
