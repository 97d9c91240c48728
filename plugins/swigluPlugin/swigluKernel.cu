/*
 * SwiGLU kernels. Memory-bound: the fast path reads 16 bytes of gate and 16 bytes of up and
 * writes 16 bytes per item, grid-stride over (row, unit) with the unit fastest. A scalar
 * kernel covers F not divisible by the vector width and unaligned pointers.
 */
#include "swigluKernel.h"

#include "../common/kernelCommon.cuh"

#include <climits>

namespace llamaexport
{
namespace
{

__device__ __forceinline__ float silu(float g)
{
    // g * sigmoid(g); for g -> -inf, __expf overflows to inf and the quotient is -0.
    return g / (1.0f + __expf(-g));
}

// Idx: int32_t when the whole loop fits (fitsInt32Loop: cheaper division), else int64_t.
template <typename T, int VEC, typename Idx>
__global__ void __launch_bounds__(kBlock) swigluVecKernel(
    T const* __restrict__ x, T* __restrict__ y, int32_t F, int32_t unitsPerRow, Idx work)
{
    Idx const stride = static_cast<Idx>(gridDim.x) * static_cast<Idx>(blockDim.x);
    for (Idx i = static_cast<Idx>(blockIdx.x) * static_cast<Idx>(blockDim.x) + threadIdx.x; i < work; i += stride)
    {
        int32_t const u = static_cast<int32_t>(i % unitsPerRow);
        int64_t const r = i / unitsPerRow;
        int32_t const f = u * VEC;
        T const* xr = x + r * 2 * F;
        Packed<T, VEC> const g = loadPacked<T, VEC>(xr + f);
        Packed<T, VEC> const up = loadPacked<T, VEC>(xr + F + f);
        Packed<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k)
        {
            out.v[k] = fromFloat<T>(silu(toFloat(g.v[k])) * toFloat(up.v[k]));
        }
        storePacked<T, VEC>(y + r * F + f, out);
    }
}

template <typename T>
__global__ void __launch_bounds__(kBlock) swigluScalarKernel(
    T const* __restrict__ x, T* __restrict__ y, int32_t F, int64_t total)
{
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int64_t const r = e / F;
        int64_t const f = e - r * F;
        float const g = toFloat(x[r * 2 * F + f]);
        float const up = toFloat(x[r * 2 * F + F + f]);
        y[e] = fromFloat<T>(silu(g) * up);
    }
}

template <typename T>
cudaError_t launchTyped(cudaStream_t stream, void const* xp, void* yp, int64_t rows, int32_t F)
{
    auto const* x = static_cast<T const*>(xp);
    auto* y = static_cast<T*>(yp);
    constexpr int VEC = kVec16<T>;
    int32_t const unitsPerRow = F / VEC;
    int64_t const work = rows * unitsPerRow;
    if (F % VEC == 0 && isAligned(x, 16) && isAligned(y, 16))
    {
        int const blocks = gridFor(work);
        if (fitsInt32Loop(work, blocks))
        {
            swigluVecKernel<T, VEC, int32_t>
                <<<blocks, kBlock, 0, stream>>>(x, y, F, unitsPerRow, static_cast<int32_t>(work));
        }
        else
        {
            swigluVecKernel<T, VEC, int64_t><<<blocks, kBlock, 0, stream>>>(x, y, F, unitsPerRow, work);
        }
    }
    else
    {
        int64_t const total = rows * F;
        swigluScalarKernel<T><<<gridFor(total), kBlock, 0, stream>>>(x, y, F, total);
    }
    return cudaGetLastError();
}

} // namespace

cudaError_t swigluLaunch(cudaStream_t stream, void const* x, void* y, DType type, int64_t rows, int32_t ffnDim)
{
    if (rows < 0 || ffnDim < 0)
    {
        return cudaErrorInvalidValue;
    }
    if (rows == 0 || ffnDim == 0)
    {
        return cudaSuccess;
    }
    if (x == nullptr || y == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    switch (type)
    {
    case DType::kFP32: return launchTyped<float>(stream, x, y, rows, ffnDim);
    case DType::kFP16: return launchTyped<__half>(stream, x, y, rows, ffnDim);
    case DType::kBF16: return launchTyped<__nv_bfloat16>(stream, x, y, rows, ffnDim);
    }
    return cudaErrorInvalidValue;
}

} // namespace llamaexport
