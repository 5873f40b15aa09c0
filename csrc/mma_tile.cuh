// Dtype conversions shared by every kernel, and the warp-level tile products of the attention kernel.
// CUDA headers only.
//
// A warp owns a 16-row strip of an output tile held in registers in the accumulator layout of
// mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"): with g = lane / 4 and
// t = lane % 4, acc[n][0..1] hold C[g][8n + 2t + {0,1}] and acc[n][2..3] hold C[g + 8][8n + 2t + {0,1}].
// bf16/fp16 operands run on tensor cores; float operands use FMAs in the same ownership layout,
// so the callers' softmax code is the same for every dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace llm2comp {

template <typename T>
constexpr bool kIsHalf = std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value;

template <typename T>
__device__ __forceinline__ float to_float(T x) {
    if constexpr (std::is_same<T, float>::value) {
        return x;
    } else if constexpr (std::is_same<T, __half>::value) {
        return __half2float(x);
    } else {
        return __bfloat162float(x);
    }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
    if constexpr (std::is_same<T, float>::value) {
        return x;
    } else if constexpr (std::is_same<T, __half>::value) {
        return __float2half_rn(x);
    } else {
        return __float2bfloat16_rn(x);
    }
}

// Two 16-bit values as one 32-bit register, `lo` in the low half (the lower k or column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
    uint16_t l, h;
    static_assert(sizeof(T) == 2, "pack2 is for 16-bit types");
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

// Two consecutive 16-bit elements; `p` must be 4-byte aligned (even element offset in an aligned row).
template <typename T>
__device__ __forceinline__ uint32_t load2(const T* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// c[0..3] += A(16x16, row-major fragment a) * B(16x8, column fragment b), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// acc[n] += A[16 x K] . B[8n .. 8n+7][0 .. K)^T: A rows and B rows both run along k (a "Q K^T" product).
// A and B are row-major in shared memory with leading dims lda/ldb (even for 16-bit types); K % 16 == 0.
template <typename T, int NT>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[NT][4], const T* A, int lda, const T* B, int ldb, int K) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (kIsHalf<T>) {
        for (int k0 = 0; k0 < K; k0 += 16) {
            uint32_t a[4];
            a[0] = load2(A + g * lda + k0 + 2 * t);
            a[1] = load2(A + (g + 8) * lda + k0 + 2 * t);
            a[2] = load2(A + g * lda + k0 + 8 + 2 * t);
            a[3] = load2(A + (g + 8) * lda + k0 + 8 + 2 * t);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const T* brow = B + (8 * n + g) * ldb + k0;
                uint32_t b[2] = {load2(brow + 2 * t), load2(brow + 8 + 2 * t)};
                mma_16816<T>(acc[n], a, b);
            }
        }
    } else {
        for (int k = 0; k < K; ++k) {
            const float a0 = A[g * lda + k], a1 = A[(g + 8) * lda + k];
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const float b0 = B[(8 * n + 2 * t) * ldb + k], b1 = B[(8 * n + 2 * t + 1) * ldb + k];
                acc[n][0] = fmaf(a0, b0, acc[n][0]);
                acc[n][1] = fmaf(a0, b1, acc[n][1]);
                acc[n][2] = fmaf(a1, b0, acc[n][2]);
                acc[n][3] = fmaf(a1, b1, acc[n][3]);
            }
        }
    }
}

// acc[n] += P[16 x K] . V[0 .. K)[8n .. 8n+7]: P row-major (ld ldp), V row-major [K][...] (ld ldv),
// a "P V" product. K % 16 == 0.
template <typename T, int NT>
__device__ __forceinline__ void warp_mma_ab(float (&acc)[NT][4], const T* P, int ldp, const T* V, int ldv, int K) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (kIsHalf<T>) {
        for (int k0 = 0; k0 < K; k0 += 16) {
            uint32_t a[4];
            a[0] = load2(P + g * ldp + k0 + 2 * t);
            a[1] = load2(P + (g + 8) * ldp + k0 + 2 * t);
            a[2] = load2(P + g * ldp + k0 + 8 + 2 * t);
            a[3] = load2(P + (g + 8) * ldp + k0 + 8 + 2 * t);
            const T* v0 = V + (k0 + 2 * t) * ldv;  // rows k0+2t, +1, +8, +9 of V
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int col = 8 * n + g;
                uint32_t b[2] = {pack2(v0[col], v0[ldv + col]), pack2(v0[8 * ldv + col], v0[9 * ldv + col])};
                mma_16816<T>(acc[n], a, b);
            }
        }
    } else {
        for (int k = 0; k < K; ++k) {
            const float p0 = P[g * ldp + k], p1 = P[(g + 8) * ldp + k];
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const float v0 = V[k * ldv + 8 * n + 2 * t], v1 = V[k * ldv + 8 * n + 2 * t + 1];
                acc[n][0] = fmaf(p0, v0, acc[n][0]);
                acc[n][1] = fmaf(p0, v1, acc[n][1]);
                acc[n][2] = fmaf(p1, v0, acc[n][2]);
                acc[n][3] = fmaf(p1, v1, acc[n][3]);
            }
        }
    }
}

// Max / sum over the 4 lanes of a quad (the lanes sharing rows g and g + 8).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace llm2comp
