/*
 * Kernel smoke test, built in every configuration (LLAMAEXPORT_KERNELS_ONLY too): runs RoPE and
 * SwiGLU through their launchers on small seeded inputs and compares with a double-precision CPU
 * reference computed from the same (rounded) inputs. Covers both RoPE layouts, partial rotary,
 * fp32 tables, batch-broadcast tables, and shapes/offsets that force the scalar fallback.
 * Exit 0: pass; 1: mismatch or CUDA error; 77: no CUDA device (skipped).
 */
#include "../ropePlugin/ropeKernel.h"
#include "../swigluPlugin/swigluKernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace llamaexport;

namespace
{

struct Tol
{
    double atol, rtol;
};

template <typename T>
struct Traits;
template <>
struct Traits<float>
{
    static constexpr DType kType = DType::kFP32;
    static constexpr Tol kTol{1e-5, 1e-5};
    static float from(double v) { return static_cast<float>(v); }
    static double to(float v) { return v; }
};
template <>
struct Traits<__half>
{
    static constexpr DType kType = DType::kFP16;
    static constexpr Tol kTol{1e-3, 2e-3};
    static __half from(double v) { return __float2half(static_cast<float>(v)); }
    static double to(__half v) { return __half2float(v); }
};
template <>
struct Traits<__nv_bfloat16>
{
    static constexpr DType kType = DType::kBF16;
    static constexpr Tol kTol{1e-2, 1.6e-2};
    static __nv_bfloat16 from(double v) { return __float2bfloat16(static_cast<float>(v)); }
    static double to(__nv_bfloat16 v) { return __bfloat162float(v); }
};

int gFailures = 0;

#define CHECK_CUDA(call)                                                                                               \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t const e_ = (call);                                                                                 \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);                      \
            std::exit(1);                                                                                              \
        }                                                                                                              \
    } while (0)

template <typename T>
std::vector<T> randomVec(size_t n, std::mt19937& rng)
{
    std::normal_distribution<double> dist(0.0, 1.0);
    std::vector<T> v(n);
    for (auto& e : v)
        e = Traits<T>::from(dist(rng));
    return v;
}

//! Device buffer holding `host` at an element offset (offset > 0 misaligns it on purpose).
template <typename T>
struct DeviceBuf
{
    char* base{nullptr};
    T* ptr{nullptr};
    DeviceBuf(size_t n, size_t offset)
    {
        CHECK_CUDA(cudaMalloc(&base, (n + offset) * sizeof(T) + 16));
        ptr = reinterpret_cast<T*>(base) + offset;
    }
    ~DeviceBuf() { cudaFree(base); }
};

template <typename T>
void report(char const* what, std::vector<T> const& got, std::vector<double> const& ref)
{
    Tol const tol = Traits<T>::kTol;
    double maxErr = 0;
    size_t bad = 0;
    for (size_t i = 0; i < ref.size(); ++i)
    {
        double const err = std::fabs(Traits<T>::to(got[i]) - ref[i]);
        maxErr = std::max(maxErr, err);
        if (!(err <= tol.atol + tol.rtol * std::fabs(ref[i])))
            ++bad;
    }
    std::printf("%-4s %-60s max_abs_err=%.3g %s\n", bad ? "FAIL" : "ok", what, maxErr, bad ? "<--" : "");
    if (bad)
        ++gFailures;
}

template <typename T, typename TC>
void ropeCase(
    int B, int H, int S, int hd, int rd, bool interleaved, bool broadcastTable, size_t offset, std::mt19937& rng)
{
    int const half = rd / 2;
    int const Bt = broadcastTable ? 1 : B;
    size_t const nx = static_cast<size_t>(B) * H * S * hd;
    size_t const nt = static_cast<size_t>(Bt) * S * half;
    auto const x = randomVec<T>(nx, rng);
    std::vector<TC> cs(nt), sn(nt);
    std::uniform_real_distribution<double> ang(-3.14159, 3.14159);
    for (size_t i = 0; i < nt; ++i)
    {
        double const a = ang(rng);
        cs[i] = Traits<TC>::from(std::cos(a));
        sn[i] = Traits<TC>::from(std::sin(a));
    }
    std::vector<double> ref(nx);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int s = 0; s < S; ++s)
            {
                size_t const row = ((static_cast<size_t>(b) * H + h) * S + s) * hd;
                size_t const tab = (static_cast<size_t>(broadcastTable ? 0 : b) * S + s) * half;
                for (int d = 0; d < hd; ++d)
                    ref[row + d] = Traits<T>::to(x[row + d]);
                for (int j = 0; j < half; ++j)
                {
                    int const d1 = interleaved ? 2 * j : j;
                    int const d2 = interleaved ? 2 * j + 1 : j + half;
                    double const c = Traits<TC>::to(cs[tab + j]), s_ = Traits<TC>::to(sn[tab + j]);
                    double const x1 = Traits<T>::to(x[row + d1]), x2 = Traits<T>::to(x[row + d2]);
                    ref[row + d1] = x1 * c - x2 * s_;
                    ref[row + d2] = x1 * s_ + x2 * c;
                }
            }
    DeviceBuf<T> dx(nx, offset), dy(nx, offset);
    DeviceBuf<TC> dc(nt, 0), ds(nt, 0);
    CHECK_CUDA(cudaMemcpy(dx.ptr, x.data(), nx * sizeof(T), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dc.ptr, cs.data(), nt * sizeof(TC), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(ds.ptr, sn.data(), nt * sizeof(TC), cudaMemcpyHostToDevice));
    CHECK_CUDA(ropeLaunch(nullptr, dx.ptr, dc.ptr, ds.ptr, dy.ptr, Traits<T>::kType, Traits<TC>::kType,
        RopeShape{B, H, S, hd, rd, Bt}, interleaved));
    std::vector<T> y(nx);
    CHECK_CUDA(cudaMemcpy(y.data(), dy.ptr, nx * sizeof(T), cudaMemcpyDeviceToHost));
    char what[160];
    std::snprintf(what, sizeof(what), "rope x=%d table=%d B%d H%d S%d hd%d rd%d il%d bcast%d off%zu",
        static_cast<int>(Traits<T>::kType), static_cast<int>(Traits<TC>::kType), B, H, S, hd, rd, interleaved,
        broadcastTable, offset);
    report(what, y, ref);
}

template <typename T>
void swigluCase(int rows, int F, size_t offset, std::mt19937& rng)
{
    size_t const nx = static_cast<size_t>(rows) * 2 * F;
    size_t const ny = static_cast<size_t>(rows) * F;
    auto const x = randomVec<T>(nx, rng);
    std::vector<double> ref(ny);
    for (int r = 0; r < rows; ++r)
        for (int f = 0; f < F; ++f)
        {
            double const g = Traits<T>::to(x[static_cast<size_t>(r) * 2 * F + f]);
            double const up = Traits<T>::to(x[static_cast<size_t>(r) * 2 * F + F + f]);
            ref[static_cast<size_t>(r) * F + f] = g / (1.0 + std::exp(-g)) * up;
        }
    DeviceBuf<T> dx(nx, offset), dy(ny, offset);
    CHECK_CUDA(cudaMemcpy(dx.ptr, x.data(), nx * sizeof(T), cudaMemcpyHostToDevice));
    CHECK_CUDA(swigluLaunch(nullptr, dx.ptr, dy.ptr, Traits<T>::kType, rows, F));
    std::vector<T> y(ny);
    CHECK_CUDA(cudaMemcpy(y.data(), dy.ptr, ny * sizeof(T), cudaMemcpyDeviceToHost));
    char what[160];
    std::snprintf(what, sizeof(what), "swiglu dtype=%d rows%d F%d off%zu", static_cast<int>(Traits<T>::kType), rows, F,
        offset);
    report(what, y, ref);
}

template <typename T, typename TC>
void ropeAll(std::mt19937& rng)
{
    for (bool il : {true, false})
    {
        ropeCase<T, TC>(2, 5, 7, 64, 64, il, false, 0, rng);  // vector path, H not a multiple of 4
        ropeCase<T, TC>(1, 8, 1, 128, 128, il, false, 0, rng); // decode
        ropeCase<T, TC>(1, 9, 33, 64, 64, il, false, 0, rng);  // SmolLM2 query heads
        ropeCase<T, TC>(1, 4, 3, 64, 8, il, false, 0, rng);   // rd/2 not a multiple of the vector width
        ropeCase<T, TC>(2, 3, 4, 64, 32, il, true, 0, rng);   // partial rotary, broadcast table
        ropeCase<T, TC>(1, 2, 3, 10, 6, il, false, 0, rng);   // scalar path (odd widths)
        ropeCase<T, TC>(1, 4, 5, 64, 64, il, false, 1, rng);  // scalar path (unaligned x / y)
    }
}

} // namespace

int main()
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    {
        std::printf("no CUDA device: skipped\n");
        return 77;
    }
    std::mt19937 rng(0);
    ropeAll<float, float>(rng);
    ropeAll<__half, __half>(rng);
    ropeAll<__half, float>(rng);
    ropeAll<__nv_bfloat16, __nv_bfloat16>(rng);
    ropeAll<__nv_bfloat16, float>(rng);
    for (size_t off : {size_t{0}, size_t{1}})
    {
        swigluCase<float>(6, 96, off, rng);
        swigluCase<__half>(6, 96, off, rng);
        swigluCase<__nv_bfloat16>(6, 96, off, rng);
        swigluCase<__half>(3, 13, off, rng); // F not a multiple of the vector width
    }
    // Bad arguments are refused, not launched.
    if (ropeLaunch(nullptr, nullptr, nullptr, nullptr, nullptr, DType::kFP16, DType::kFP16, RopeShape{1, 1, 1, 8, 3, 1},
            true)
        != cudaErrorInvalidValue)
    {
        std::printf("FAIL odd rotary_dim accepted\n");
        ++gFailures;
    }
    std::printf(gFailures ? "%d case(s) FAILED\n" : "all cases passed\n", gFailures);
    return gFailures ? 1 : 0;
}
