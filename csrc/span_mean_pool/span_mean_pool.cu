// span_mean_pool forward and backward: one block per (row, D-tile), 16-byte vector loads along D when
// the pointers and D allow it, fp32 accumulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "device.cuh"

namespace llm2comp {
namespace {

constexpr int kThreads = 128;

// VEC elements of T moved as one 16-byte (or, for VEC == 1, one scalar) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
    T v[VEC];
};

// 0 <= s and 1 <= n and s + n <= L: what the Python API checks; a direct torch.ops call may skip it, and an
// invalid span then gives a NaN row instead of an out-of-bounds read.
__device__ __forceinline__ bool valid_span(int64_t s, int64_t n, int64_t L) { return s >= 0 && n >= 1 && s <= L - n; }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) span_mean_pool_fwd_kernel(
    const T* __restrict__ hidden,       // [B, L, D]
    const int64_t* __restrict__ start,  // [B]
    const int64_t* __restrict__ length, // [B]
    T* __restrict__ out,                // [B, D]
    int64_t L, int64_t D, int64_t tiles_per_row) {
    const int64_t b = blockIdx.x / tiles_per_row;
    const int64_t d0 = ((blockIdx.x % tiles_per_row) * kThreads + threadIdx.x) * VEC;
    if (d0 >= D) return;  // D % VEC == 0, so a vector starting inside D ends inside it
    const int64_t s = start[b], n = length[b];
    Vec<T, VEC> y;
    if (!valid_span(s, n, L)) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) y.v[j] = from_float<T>(kNaN);
        *reinterpret_cast<Vec<T, VEC>*>(out + b * D + d0) = y;
        return;
    }
    const Vec<T, VEC>* src = reinterpret_cast<const Vec<T, VEC>*>(hidden + (b * L + s) * D + d0);
    const int64_t step = D / VEC;  // one position, in vectors
    float acc[VEC] = {};
#pragma unroll 4
    for (int64_t i = 0; i < n; ++i) {
        const Vec<T, VEC> x = src[i * step];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += to_float(x.v[j]);
    }
    const float inv = 1.0f / static_cast<float>(n);
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = from_float<T>(acc[j] * inv);
    *reinterpret_cast<Vec<T, VEC>*>(out + b * D + d0) = y;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) span_mean_pool_bwd_kernel(
    const T* __restrict__ grad_out,     // [B, D]
    const int64_t* __restrict__ start,  // [B]
    const int64_t* __restrict__ length, // [B]
    T* __restrict__ grad_hidden,        // [B, L, D]
    int64_t L, int64_t D, int64_t tiles_per_row) {
    const int64_t b = blockIdx.x / tiles_per_row;
    const int64_t d0 = ((blockIdx.x % tiles_per_row) * kThreads + threadIdx.x) * VEC;
    if (d0 >= D) return;
    const int64_t s = start[b], n = length[b];
    const Vec<T, VEC> g = *reinterpret_cast<const Vec<T, VEC>*>(grad_out + b * D + d0);
    const bool valid = valid_span(s, n, L);
    const float inv = 1.0f / static_cast<float>(n);
    Vec<T, VEC> inside, zero;  // an invalid span: NaN over the whole row
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        inside.v[j] = from_float<T>(valid ? to_float(g.v[j]) * inv : kNaN);
        zero.v[j] = from_float<T>(valid ? 0.0f : kNaN);
    }
    Vec<T, VEC>* dst = reinterpret_cast<Vec<T, VEC>*>(grad_hidden + b * L * D + d0);
    const int64_t step = D / VEC;
    // Writing the zeros here too makes one pass over [B, L, D] instead of a memset plus a scatter.
#pragma unroll 4
    for (int64_t l = 0; l < L; ++l) dst[l * step] = (l >= s && l < s + n) ? inside : zero;
}

// The widest vector (16 bytes) when every row start is aligned to it, else scalar accesses. Rows start
// at multiples of D elements, so D % VEC != 0 breaks alignment for all but the first row: then the
// whole op runs scalar, which still coalesces across the warp.
template <typename T>
int vector_width(const void* a, const void* b, int64_t D) {
    constexpr int kVec = 16 / sizeof(T);
    const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
    return (aligned && D % kVec == 0) ? kVec : 1;
}

// launch(VEC, grid, tiles) with VEC (a std::integral_constant) the widest vector `a` and `b` allow, and a grid
// of one block per (row, tile of kThreads * VEC columns).
template <typename T, typename Launch>
cudaError_t launch_rows(const void* a, const void* b, int64_t B, int64_t D, Launch&& launch) {
    constexpr int kVec = 16 / sizeof(T);
    const int vec = vector_width<T>(a, b, D);
    const int64_t tiles = (D + int64_t(kThreads) * vec - 1) / (int64_t(kThreads) * vec);
    const dim3 grid(static_cast<unsigned>(B * tiles));
    if (vec == kVec) return launch(std::integral_constant<int, kVec>(), grid, tiles);
    return launch(std::integral_constant<int, 1>(), grid, tiles);
}

template <typename T>
cudaError_t launch_fwd(const void* hidden, const int64_t* start, const int64_t* length, void* out, int64_t B,
                       int64_t L, int64_t D, cudaStream_t stream) {
    auto h = static_cast<const T*>(hidden);
    auto o = static_cast<T*>(out);
    return launch_rows<T>(hidden, out, B, D, [&](auto vec, dim3 grid, int64_t tiles) {
        return launch_kernel(span_mean_pool_fwd_kernel<T, decltype(vec)::value>, grid, kThreads, 0, stream, h, start,
                             length, o, L, D, tiles);
    });
}

template <typename T>
cudaError_t launch_bwd(const void* grad_out, const int64_t* start, const int64_t* length, void* grad_hidden,
                       int64_t B, int64_t L, int64_t D, cudaStream_t stream) {
    auto g = static_cast<const T*>(grad_out);
    auto gh = static_cast<T*>(grad_hidden);
    return launch_rows<T>(grad_out, grad_hidden, B, D, [&](auto vec, dim3 grid, int64_t tiles) {
        return launch_kernel(span_mean_pool_bwd_kernel<T, decltype(vec)::value>, grid, kThreads, 0, stream, g, start,
                             length, gh, L, D, tiles);
    });
}

}  // namespace

cudaError_t span_mean_pool_fwd(DType dtype, const void* hidden, const int64_t* start, const int64_t* length,
                               void* out, int64_t B, int64_t L, int64_t D, cudaStream_t stream) {
    switch (dtype) {
        case DType::kFloat32: return launch_fwd<float>(hidden, start, length, out, B, L, D, stream);
        case DType::kFloat16: return launch_fwd<__half>(hidden, start, length, out, B, L, D, stream);
        case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(hidden, start, length, out, B, L, D, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t span_mean_pool_bwd(DType dtype, const void* grad_out, const int64_t* start, const int64_t* length,
                               void* grad_hidden, int64_t B, int64_t L, int64_t D, cudaStream_t stream) {
    switch (dtype) {
        case DType::kFloat32: return launch_bwd<float>(grad_out, start, length, grad_hidden, B, L, D, stream);
        case DType::kFloat16: return launch_bwd<__half>(grad_out, start, length, grad_hidden, B, L, D, stream);
        case DType::kBFloat16:
            return launch_bwd<__nv_bfloat16>(grad_out, start, length, grad_hidden, B, L, D, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace llm2comp
