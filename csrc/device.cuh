// Dtype conversions shared by every kernel, the kernel launch, and the warp-level pieces of the attention
// kernel: tensor-core products, fragment loads from shared memory, asynchronous copies. CUDA headers only.
// Built with -DLLM2COMP_CPU_EMULATION (tests/cuda_emulation), the launch, the shared memory and the PTX
// wrappers come from the emulator instead, and the kernels run on the CPU.
//
// Fragments of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4 and
// t = lane % 4, each register holding two 16-bit elements (lower column first):
// - A (16 x 16, row-major): a[0] = A[g][2t..], a[1] = A[g + 8][2t..], a[2] = A[g][2t + 8..], a[3] = A[g + 8][2t + 8..];
// - B (16 x 8, column-major): b[0] = B[2t..][g], b[1] = B[2t + 8..][g];
// - C/D (16 x 8, fp32): c[0..1] = C[g][2t + {0,1}], c[2..3] = C[g + 8][2t + {0,1}].
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <limits>
#include <type_traits>
#include <utility>

#ifdef LLM2COMP_CPU_EMULATION
#include "cpu_emulation.h"
#endif

namespace llm2comp {

// What a kernel writes for an input the Python API would have rejected (a direct torch.ops call skips it).
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

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

#ifndef LLM2COMP_CPU_EMULATION

// kernel<<<grid, block, smem_bytes, stream>>>(args...), and the launch status.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Args&&... args) {
    kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
    return cudaGetLastError();
}

// The block's dynamic shared memory (the launch's smem_bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    return reinterpret_cast<T*>(smem_raw);
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

__device__ __forceinline__ uint32_t smem_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements from shared memory: lanes 8j .. 8j+7 give the addresses of matrix j's
// rows (16-byte aligned), and every lane receives in r[j] the elements (lane / 4, 2 (lane % 4) + {0, 1}) of
// matrix j: the mma fragment layout. TRANS: elements (2 (lane % 4) + {0, 1}, lane / 4) instead, i.e. the
// fragment of the transposed matrix.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    if constexpr (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_address(row)));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_address(row)));
    }
}

// 16 bytes global -> shared without going through registers (sm_80+); `valid` false writes 16 zero bytes
// instead and reads nothing (src must still be a mapped address). Completes at cp_async_wait.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_address(dst)), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups of this thread's copies are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

#endif  // LLM2COMP_CPU_EMULATION

// acc[n] += a . B_n for the NT 8-column tiles B_n of one 16-deep step, B's fragments loaded two tiles at a time
// by ldmatrix (TRANS for a B stored k-major, like V) from `b`, this lane's address of the first pair, with
// `pair_stride` elements between pairs.
template <typename T, bool TRANS, int NT>
__device__ __forceinline__ void mma_tile_pairs(float (&acc)[NT][4], const uint32_t (&a)[4], const T* b,
                                               int pair_stride) {
#pragma unroll
    for (int j = 0; j < NT / 2; ++j) {
        uint32_t f[4];  // fragments of tiles 2j (f[0..1]) and 2j + 1 (f[2..3])
        ldmatrix_x4<TRANS>(f, b + j * pair_stride);
        const uint32_t b0[2] = {f[0], f[1]}, b1[2] = {f[2], f[3]};
        mma_16816<T>(acc[2 * j], a, b0);
        mma_16816<T>(acc[2 * j + 1], a, b1);
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
