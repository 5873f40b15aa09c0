// memory_attention forward: flash-attention style, tensor cores (mma.sync m16n8k16), fp32 online softmax.
//
// One block of 4 warps per (64-query block, batch row, q head); each warp owns 16 query rows, keeps its
// scores S (16 x 64) and output O (16 x d) in registers and goes through the key blocks of the row.
// Padding is skipped: key blocks at or past seq_lens[b] are never loaded (rows past it inside the last
// block are zero-filled in shared memory), a query block entirely in the padding only writes zeros,
// and padded query rows of a partial block are written as zeros. GQA: q head h reads kv head
// h / (Hq / Hkv), by index. Causal blocks stop at the block's last query.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "mma_tile.cuh"

namespace llm2comp {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // queries per block
constexpr int kBlockN = 64;           // keys per step
constexpr int kPad = 8;               // row padding (elements): conflict-free fragment loads, 16-byte rows
constexpr float kLog2e = 1.4426950408889634f;

template <int HD>
constexpr size_t smem_bytes() {
    // Q, K, V tiles and each warp's probabilities P (16 x kBlockN), all 16-bit.
    return 2 * ((kBlockM + 2 * kBlockN) * (HD + kPad) + kWarps * 16 * (kBlockN + kPad));
}

// tile[r][:] = rows row0 + r of a [L, HD] slab with row stride `ld` (elements), for rows < valid;
// zeros for the rest. 16-byte accesses: the binding guarantees aligned bases and strides.
template <typename T, int HD, int ROWS>
__device__ __forceinline__ void load_rows(T* tile, const T* __restrict__ src, int64_t ld, int row0, int valid) {
    constexpr int kVecs = HD / 8;  // 8 16-bit elements per 16 bytes
    for (int i = threadIdx.x; i < ROWS * kVecs; i += kThreads) {
        const int r = i / kVecs, c = (i % kVecs) * 8;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (row0 + r < valid) x = *reinterpret_cast<const uint4*>(src + (row0 + r) * ld + c);
        *reinterpret_cast<uint4*>(tile + r * (HD + kPad) + c) = x;
    }
}

template <typename T, int HD, bool CAUSAL>
__global__ void __launch_bounds__(kThreads) memory_attention_fwd_kernel(
    const T* __restrict__ q,                // [B, Hq, L, HD], strides sq
    const T* __restrict__ k,                // [B, Hkv, L, HD], strides sk
    const T* __restrict__ v,                // [B, Hkv, L, HD], strides sv
    const int64_t* __restrict__ seq_lens,   // [B]
    T* __restrict__ out,                    // [B, Hq, L, HD] contiguous
    int64_t Hq, int64_t group, int L, int blocks_m, AttentionStrides sq, AttentionStrides sk, AttentionStrides sv,
    float scale_log2) {
    constexpr int LD = HD + kPad, LDP = kBlockN + kPad, NT_S = kBlockN / 8, NT_O = HD / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + kBlockM * LD;
    T* Vs = Ks + kBlockN * LD;
    T* Ps = Vs + kBlockN * LD;

    const int64_t bh = blockIdx.x / blocks_m;
    const int m0 = (blockIdx.x % blocks_m) * kBlockM;
    const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
    // Clamped: the Python API validates 1 <= seq_lens[b] <= L, a direct torch.ops call may not.
    const int seq = static_cast<int>(min(max(seq_lens[b], int64_t(0)), int64_t(L)));
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x / 32;
    T* out_bh = out + bh * int64_t(L) * HD;

    if (m0 >= seq) {  // all padding: zeros, nothing loaded
        const T zero = from_float<T>(0.0f);
        const int rows = min(kBlockM, L - m0);
        for (int i = threadIdx.x; i < rows * HD; i += kThreads) out_bh[int64_t(m0) * HD + i] = zero;
        return;
    }

    load_rows<T, HD, kBlockM>(Qs, q + b * sq.b + h * sq.h, sq.l, m0, seq);
    const T* k_bh = k + b * sk.b + hk * sk.h;
    const T* v_bh = v + b * sv.b + hk * sv.h;

    const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    // m: row max of the scaled scores in base 2 (shared by the quad), l: this lane's partial row sum.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    T* Pw = Ps + warp * 16 * LDP;
    const int n_end = CAUSAL ? min(seq, m0 + kBlockM) : seq;

    for (int n0 = 0; n0 < n_end; n0 += kBlockN) {
        __syncthreads();  // previous K/V tiles consumed (first pass: nothing to wait for but Q's load below)
        load_rows<T, HD, kBlockN>(Ks, k_bh, sk.l, n0, seq);
        load_rows<T, HD, kBlockN>(Vs, v_bh, sv.l, n0, seq);
        __syncthreads();

        float s[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
        warp_mma_abt<T, NT_S>(s, Qs + warp * 16 * LD, LD, Ks, LD, HD);

        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n0 + 8 * n + 2 * t + (e & 1);
                const bool allowed = col < seq && (!CAUSAL || col <= rows[e >> 1]);
                s[n][e] = allowed ? s[n][e] * scale_log2 : -INFINITY;
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
            }
        }
        // Key 0 sits in the first block and every row may see it, so the running max is finite from
        // the first block on and exp2f never sees (-inf) - (-inf).
        float alpha[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float m_new = fmaxf(m[i], quad_max(tile_max[i]));
            alpha[i] = exp2f(m[i] - m_new);
            m[i] = m_new;
            l[i] *= alpha[i];
        }
#pragma unroll
        for (int n = 0; n < NT_O; ++n) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float p0 = exp2f(s[n][2 * i] - m[i]), p1 = exp2f(s[n][2 * i + 1] - m[i]);
                l[i] += p0 + p1;
                const T lo = from_float<T>(p0), hi = from_float<T>(p1);
                *reinterpret_cast<uint32_t*>(Pw + (g + 8 * i) * LDP + 8 * n + 2 * t) = pack2(lo, hi);
            }
        }
        __syncwarp();  // P is exchanged between the lanes of the warp
        warp_mma_ab<T, NT_O>(o, Pw, LDP, Vs, LD, kBlockN);
        __syncwarp();  // all lanes read P before the next step overwrites it
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float total = quad_sum(l[i]);  // before the branch: the shuffle needs all 32 lanes
        const int row = rows[i];
        if (row >= L) continue;
        const float inv = row < seq ? 1.0f / total : 0.0f;  // padded rows are exact zeros
        T* dst = out_bh + int64_t(row) * HD + 2 * t;
#pragma unroll
        for (int n = 0; n < NT_O; ++n) {
            const T lo = from_float<T>(o[n][2 * i] * inv), hi = from_float<T>(o[n][2 * i + 1] * inv);
            *reinterpret_cast<uint32_t*>(dst + 8 * n) = pack2(lo, hi);
        }
    }
}

template <typename T, int HD, bool CAUSAL>
cudaError_t launch(const void* q, const void* k, const void* v, const int64_t* seq_lens, void* out, int64_t B,
                   int64_t Hq, int64_t Hkv, int64_t L, AttentionStrides sq, AttentionStrides sk, AttentionStrides sv,
                   float scale, cudaStream_t stream) {
    constexpr size_t bytes = smem_bytes<HD>();
    auto kernel = memory_attention_fwd_kernel<T, HD, CAUSAL>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return err;
    const int blocks_m = static_cast<int>((L + kBlockM - 1) / kBlockM);
    const dim3 grid(static_cast<unsigned>(B * Hq * blocks_m));
    kernel<<<grid, kThreads, bytes, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                              static_cast<const T*>(v), seq_lens, static_cast<T*>(out), Hq,
                                              Hq / Hkv, static_cast<int>(L), blocks_m, sq, sk, sv, scale * kLog2e);
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(int64_t head_dim, bool causal, const void* q, const void* k, const void* v,
                     const int64_t* seq_lens, void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t L,
                     AttentionStrides sq, AttentionStrides sk, AttentionStrides sv, float scale, cudaStream_t stream) {
    if (head_dim == 64) {
        return causal ? launch<T, 64, true>(q, k, v, seq_lens, out, B, Hq, Hkv, L, sq, sk, sv, scale, stream)
                      : launch<T, 64, false>(q, k, v, seq_lens, out, B, Hq, Hkv, L, sq, sk, sv, scale, stream);
    }
    if (head_dim == 128) {
        return causal ? launch<T, 128, true>(q, k, v, seq_lens, out, B, Hq, Hkv, L, sq, sk, sv, scale, stream)
                      : launch<T, 128, false>(q, k, v, seq_lens, out, B, Hq, Hkv, L, sq, sk, sv, scale, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t memory_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const int64_t* seq_lens,
                                 void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t head_dim,
                                 AttentionStrides sq, AttentionStrides sk, AttentionStrides sv, bool causal,
                                 float scale, cudaStream_t stream) {
    switch (dtype) {
        case DType::kFloat16:
            return dispatch<__half>(head_dim, causal, q, k, v, seq_lens, out, B, Hq, Hkv, L, sq, sk, sv, scale,
                                    stream);
        case DType::kBFloat16:
            return dispatch<__nv_bfloat16>(head_dim, causal, q, k, v, seq_lens, out, B, Hq, Hkv, L, sq, sk, sv,
                                           scale, stream);
        case DType::kFloat32:
            break;
    }
    return cudaErrorInvalidValue;
}

}  // namespace llm2comp
