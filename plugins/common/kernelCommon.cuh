/*
 * Device helpers for the memory-bound elementwise kernels: fp32 conversions, packed (vector)
 * loads/stores, and the grid size for grid-stride loops.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

namespace llamaexport
{

template <typename T>
__device__ __forceinline__ float toFloat(T v);
template <>
__device__ __forceinline__ float toFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ float toFloat<__half>(__half v)
{
    return __half2float(v);
}
template <>
__device__ __forceinline__ float toFloat<__nv_bfloat16>(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

//! N elements moved as one aligned unit: 16 bytes -> one 128-bit load/store; 32 bytes -> two.
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Packed
{
    T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Packed<T, N> loadPacked(T const* p)
{
    return *reinterpret_cast<Packed<T, N> const*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void storePacked(T* p, Packed<T, N> const& v)
{
    *reinterpret_cast<Packed<T, N>*>(p) = v;
}

//! Elements per 16-byte vector.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

inline bool isAligned(void const* p, int64_t bytes)
{
    return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

constexpr int kBlock = 256;

//! Multiprocessors of the current device, asked of the driver once per device: every enqueue of
//! every plugin layer sizes its grid with it, and the count never changes. 0 when unknown.
inline int smCount()
{
    constexpr int kMaxDevices = 64;
    static std::atomic<int> sCache[kMaxDevices]; // zero-initialized (static storage): 0 = not asked yet
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0)
    {
        (void) cudaGetLastError(); // handled here (fallback grid); must not fail the launch status
        return 0;
    }
    int sms = device < kMaxDevices ? sCache[device].load(std::memory_order_relaxed) : 0;
    if (sms > 0)
    {
        return sms;
    }
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    {
        (void) cudaGetLastError();
        return 0;
    }
    if (device < kMaxDevices)
    {
        sCache[device].store(sms, std::memory_order_relaxed);
    }
    return sms;
}

//! Blocks for a grid-stride loop over `work` items: enough to fill the GPU a few times over,
//! no more (each thread then handles several items).
inline int gridFor(int64_t work)
{
    int sms = smCount();
    if (sms <= 0)
    {
        sms = 128;
    }
    int64_t const want = (work + kBlock - 1) / kBlock;
    int64_t const cap = static_cast<int64_t>(sms) * 32;
    return static_cast<int>(want < cap ? (want > 0 ? want : 1) : cap);
}

//! True when a grid-stride loop over `work` items with `blocks` x kBlock threads can count in
//! int32: the last index it forms, (work - 1) + blocks * kBlock, stays <= INT32_MAX. Larger loops
//! count in int64 (a signed int32 index would overflow near 2^31 items).
inline bool fitsInt32Loop(int64_t work, int blocks)
{
    return work + static_cast<int64_t>(blocks) * kBlock <= static_cast<int64_t>(INT32_MAX);
}

} // namespace llamaexport
