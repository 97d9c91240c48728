/*
 * Types shared by the CUDA launchers and their callers (the TensorRT plugins, the C API that
 * tests and scripts/gpu_kernels.py load with ctypes). No TensorRT header here: the kernels build
 * without TensorRT (LLAMAEXPORT_KERNELS_ONLY).
 */
#pragma once

#include <cstdint>

namespace llamaexport
{

//! Element types the kernels accept; the plugins map nvinfer1::DataType onto these.
//! The values are part of the C API (kernelApi.h): keep them stable.
enum class DType : int32_t
{
    kFP32 = 0,
    kFP16 = 1,
    kBF16 = 2,
};

inline int32_t dtypeSize(DType t) noexcept
{
    return t == DType::kFP32 ? 4 : 2;
}

} // namespace llamaexport
