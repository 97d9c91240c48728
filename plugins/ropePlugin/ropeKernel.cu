/*
 * RoPE kernels. Memory-bound: the fast path moves 16 bytes per load/store, and one thread
 * handles one 16-byte slice of the head dim for several heads, so each cos/sin slice is
 * loaded once per 4 (interleaved) or 2 (halves) heads. Work items are enumerated (unit, s, head group, b) with the unit
 * fastest, so a warp touches consecutive bytes of consecutive rows. A scalar kernel covers
 * shapes or pointers the vector path cannot (odd dims, unaligned views).
 */
#include "ropeKernel.h"

#include "../common/kernelCommon.cuh"

#include <climits>

namespace llamaexport
{
namespace
{

// Heads per thread: 4 x 16-byte vectors in flight per thread; the halves layout loads two
// vectors per head (j and j + rd/2), so it takes 2 heads to keep registers (and occupancy) alike.
template <bool INTERLEAVED>
constexpr int kHeadsPerThread = INTERLEAVED ? 4 : 2;

// A unit is VEC consecutive elements of one row (b, h, s, :):
//   interleaved: unit u < rotUnits covers d in [u*VEC, u*VEC+VEC), i.e. VEC/2 pairs;
//   halves:      unit u < rotUnits covers d in [u*VEC, ..) and its partners d + rd/2;
//   u >= rotUnits: passthrough of d in [rd + (u-rotUnits)*VEC, ..).
// Idx: int32_t when the whole loop fits (fitsInt32Loop: cheaper division), else int64_t.
template <typename T, typename TC, int VEC, bool INTERLEAVED, typename Idx>
__global__ void __launch_bounds__(kBlock) ropeVecKernel(T const* __restrict__ x, TC const* __restrict__ cosT,
    TC const* __restrict__ sinT, T* __restrict__ y, int32_t H, int32_t S, int32_t hd, int32_t rd,
    int64_t tableBatchStride, int32_t unitsPerRow, int32_t rotUnits, int32_t headGroups, Idx work)
{
    constexpr int kPairs = INTERLEAVED ? VEC / 2 : VEC; // cos/sin values per unit
    constexpr int kHeads = kHeadsPerThread<INTERLEAVED>;
    int32_t const half = rd / 2;
    int64_t const headStride = static_cast<int64_t>(S) * hd;
    Idx const stride = static_cast<Idx>(gridDim.x) * static_cast<Idx>(blockDim.x);
    for (Idx i = static_cast<Idx>(blockIdx.x) * static_cast<Idx>(blockDim.x) + threadIdx.x; i < work; i += stride)
    {
        int32_t const u = static_cast<int32_t>(i % unitsPerRow);
        Idx t = i / unitsPerRow;
        int32_t const s = static_cast<int32_t>(t % S);
        t /= S;
        int32_t const g = static_cast<int32_t>(t % headGroups);
        int32_t const b = static_cast<int32_t>(t / headGroups);
        int32_t const h0 = g * kHeads;
        int32_t const nh = min(kHeads, H - h0);
        // x/y offset of (b, h0, s, 0)
        int64_t const row = (static_cast<int64_t>(b) * H + h0) * headStride + static_cast<int64_t>(s) * hd;

        if (u < rotUnits)
        {
            int32_t const d = u * VEC;
            int64_t const tab = b * tableBatchStride + static_cast<int64_t>(s) * half + (INTERLEAVED ? d / 2 : d);
            Packed<TC, kPairs> const cp = loadPacked<TC, kPairs>(cosT + tab);
            Packed<TC, kPairs> const sp = loadPacked<TC, kPairs>(sinT + tab);
            float c[kPairs];
            float sn[kPairs];
#pragma unroll
            for (int k = 0; k < kPairs; ++k)
            {
                c[k] = toFloat(cp.v[k]);
                sn[k] = toFloat(sp.v[k]);
            }
            if constexpr (INTERLEAVED)
            {
                Packed<T, VEC> xv[kHeads];
#pragma unroll
                for (int k = 0; k < kHeads; ++k)
                {
                    if (k < nh)
                        xv[k] = loadPacked<T, VEC>(x + row + k * headStride + d);
                }
#pragma unroll
                for (int k = 0; k < kHeads; ++k)
                {
                    if (k < nh)
                    {
                        Packed<T, VEC> out;
#pragma unroll
                        for (int p = 0; p < VEC / 2; ++p)
                        {
                            float const x1 = toFloat(xv[k].v[2 * p]);
                            float const x2 = toFloat(xv[k].v[2 * p + 1]);
                            out.v[2 * p] = fromFloat<T>(x1 * c[p] - x2 * sn[p]);
                            out.v[2 * p + 1] = fromFloat<T>(x1 * sn[p] + x2 * c[p]);
                        }
                        storePacked<T, VEC>(y + row + k * headStride + d, out);
                    }
                }
            }
            else
            {
                Packed<T, VEC> lo[kHeads];
                Packed<T, VEC> hi[kHeads];
#pragma unroll
                for (int k = 0; k < kHeads; ++k)
                {
                    if (k < nh)
                    {
                        lo[k] = loadPacked<T, VEC>(x + row + k * headStride + d);
                        hi[k] = loadPacked<T, VEC>(x + row + k * headStride + d + half);
                    }
                }
#pragma unroll
                for (int k = 0; k < kHeads; ++k)
                {
                    if (k < nh)
                    {
                        Packed<T, VEC> o1;
                        Packed<T, VEC> o2;
#pragma unroll
                        for (int p = 0; p < VEC; ++p)
                        {
                            float const x1 = toFloat(lo[k].v[p]);
                            float const x2 = toFloat(hi[k].v[p]);
                            o1.v[p] = fromFloat<T>(x1 * c[p] - x2 * sn[p]);
                            o2.v[p] = fromFloat<T>(x1 * sn[p] + x2 * c[p]);
                        }
                        storePacked<T, VEC>(y + row + k * headStride + d, o1);
                        storePacked<T, VEC>(y + row + k * headStride + d + half, o2);
                    }
                }
            }
        }
        else
        {
            int32_t const d = rd + (u - rotUnits) * VEC;
            Packed<T, VEC> xv[kHeads];
#pragma unroll
            for (int k = 0; k < kHeads; ++k)
            {
                if (k < nh)
                    xv[k] = loadPacked<T, VEC>(x + row + k * headStride + d);
            }
#pragma unroll
            for (int k = 0; k < kHeads; ++k)
            {
                if (k < nh)
                    storePacked<T, VEC>(y + row + k * headStride + d, xv[k]);
            }
        }
    }
}

// One thread per output element; any shape, any alignment (reads each rotated element twice).
template <typename T, typename TC, bool INTERLEAVED>
__global__ void __launch_bounds__(kBlock) ropeScalarKernel(T const* __restrict__ x, TC const* __restrict__ cosT,
    TC const* __restrict__ sinT, T* __restrict__ y, int32_t H, int32_t S, int32_t hd, int32_t rd,
    int64_t tableBatchStride, int64_t total)
{
    int32_t const half = rd / 2;
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int32_t const d = static_cast<int32_t>(e % hd);
        int64_t const rowIdx = e / hd; // (b*H + h)*S + s
        int32_t const s = static_cast<int32_t>(rowIdx % S);
        int64_t const b = rowIdx / (static_cast<int64_t>(S) * H);
        if (d >= rd)
        {
            y[e] = x[e];
            continue;
        }
        int64_t const rowBase = e - d;
        int32_t j;
        int32_t d1; // first element of the pair
        int32_t d2; // second element of the pair
        if constexpr (INTERLEAVED)
        {
            j = d / 2;
            d1 = 2 * j;
            d2 = d1 + 1;
        }
        else
        {
            j = d < half ? d : d - half;
            d1 = j;
            d2 = j + half;
        }
        int64_t const tab = b * tableBatchStride + static_cast<int64_t>(s) * half + j;
        float const c = toFloat(cosT[tab]);
        float const sn = toFloat(sinT[tab]);
        float const x1 = toFloat(x[rowBase + d1]);
        float const x2 = toFloat(x[rowBase + d2]);
        y[e] = fromFloat<T>(d == d1 ? x1 * c - x2 * sn : x1 * sn + x2 * c);
    }
}

template <typename T, typename TC, bool INTERLEAVED>
cudaError_t launchTyped(cudaStream_t stream, void const* xp, void const* cp, void const* sp, void* yp,
    RopeShape const& sh)
{
    auto const* x = static_cast<T const*>(xp);
    auto const* c = static_cast<TC const*>(cp);
    auto const* s = static_cast<TC const*>(sp);
    auto* y = static_cast<T*>(yp);
    int32_t const half = sh.rotaryDim / 2;
    int64_t const tableBatchStride = sh.tableBatch == 1 ? 0 : static_cast<int64_t>(sh.seq) * half;

    constexpr int VEC = kVec16<T>;
    constexpr int kPairs = INTERLEAVED ? VEC / 2 : VEC;
    int32_t const rotSpan = INTERLEAVED ? sh.rotaryDim : half; // elements of a row the rotation units tile
    bool const vectorizable = sh.headDim % VEC == 0 && rotSpan % VEC == 0 && isAligned(x, 16)
        && isAligned(y, 16) && isAligned(c, kPairs * sizeof(TC) > 16 ? 16 : kPairs * sizeof(TC))
        && isAligned(s, kPairs * sizeof(TC) > 16 ? 16 : kPairs * sizeof(TC));
    int32_t const rotUnits = rotSpan / VEC;
    int32_t const unitsPerRow = rotUnits + (sh.headDim - sh.rotaryDim) / VEC;
    constexpr int kHeads = kHeadsPerThread<INTERLEAVED>;
    int32_t const headGroups = (sh.heads + kHeads - 1) / kHeads;
    int64_t const work = static_cast<int64_t>(sh.batch) * headGroups * sh.seq * unitsPerRow;

    if (vectorizable)
    {
        int const blocks = gridFor(work);
        if (fitsInt32Loop(work, blocks))
        {
            ropeVecKernel<T, TC, VEC, INTERLEAVED, int32_t><<<blocks, kBlock, 0, stream>>>(x, c, s, y, sh.heads,
                sh.seq, sh.headDim, sh.rotaryDim, tableBatchStride, unitsPerRow, rotUnits, headGroups,
                static_cast<int32_t>(work));
        }
        else
        {
            ropeVecKernel<T, TC, VEC, INTERLEAVED, int64_t><<<blocks, kBlock, 0, stream>>>(x, c, s, y, sh.heads,
                sh.seq, sh.headDim, sh.rotaryDim, tableBatchStride, unitsPerRow, rotUnits, headGroups, work);
        }
    }
    else
    {
        int64_t const total = static_cast<int64_t>(sh.batch) * sh.heads * sh.seq * sh.headDim;
        ropeScalarKernel<T, TC, INTERLEAVED><<<gridFor(total), kBlock, 0, stream>>>(
            x, c, s, y, sh.heads, sh.seq, sh.headDim, sh.rotaryDim, tableBatchStride, total);
    }
    return cudaGetLastError();
}

template <typename T, typename TC>
cudaError_t launchLayout(cudaStream_t stream, void const* x, void const* c, void const* s, void* y,
    RopeShape const& sh, bool interleaved)
{
    return interleaved ? launchTyped<T, TC, true>(stream, x, c, s, y, sh)
                       : launchTyped<T, TC, false>(stream, x, c, s, y, sh);
}

template <typename T>
cudaError_t launchTable(cudaStream_t stream, void const* x, void const* c, void const* s, void* y, DType tableType,
    RopeShape const& sh, bool interleaved)
{
    if (tableType == DType::kFP32)
        return launchLayout<T, float>(stream, x, c, s, y, sh, interleaved);
    return launchLayout<T, T>(stream, x, c, s, y, sh, interleaved);
}

} // namespace

cudaError_t ropeLaunch(cudaStream_t stream, void const* x, void const* cos, void const* sin, void* y, DType xType,
    DType tableType, RopeShape const& shape, bool interleaved)
{
    RopeShape const& sh = shape;
    if (sh.batch < 0 || sh.heads < 0 || sh.seq < 0 || sh.headDim <= 0 || sh.rotaryDim < 2 || sh.rotaryDim % 2 != 0
        || sh.rotaryDim > sh.headDim || (sh.tableBatch != sh.batch && sh.tableBatch != 1))
    {
        return cudaErrorInvalidValue;
    }
    if (tableType != xType && tableType != DType::kFP32)
    {
        return cudaErrorInvalidValue;
    }
    if (static_cast<int64_t>(sh.batch) * sh.heads * sh.seq == 0)
    {
        return cudaSuccess;
    }
    if (x == nullptr || cos == nullptr || sin == nullptr || y == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    switch (xType)
    {
    case DType::kFP32: return launchTable<float>(stream, x, cos, sin, y, tableType, sh, interleaved);
    case DType::kFP16: return launchTable<__half>(stream, x, cos, sin, y, tableType, sh, interleaved);
    case DType::kBF16: return launchTable<__nv_bfloat16>(stream, x, cos, sin, y, tableType, sh, interleaved);
    }
    return cudaErrorInvalidValue;
}

} // namespace llamaexport
