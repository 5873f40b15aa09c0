// memory_attention forward: flash-attention style, tensor cores (mma.sync m16n8k16), fp32 online softmax.
//
// One block of 4 or 8 warps per (64- or 128-query block, batch row, q head); each warp owns 16 query rows
// and keeps their Q fragments, scores S (16 x 64), probabilities P and output O (16 x d) in registers while
// it goes through the key blocks of the row. K and V tiles are double-buffered in shared memory: cp.async
// fetches the next block's while the tensor cores work on this one. Fragments come from shared memory
// through ldmatrix (V transposed on the way), and P never leaves registers: the accumulator layout of two
// adjacent 8-key S tiles is the A-fragment layout of one 16-key step of P V. Eight warps share each K/V tile
// among twice the queries (half the tile traffic), four give twice the blocks (more parallelism at small
// B * Hq * L); the benchmark measures both.
// Padding is skipped: key blocks at or past seq_lens[b] are never loaded (rows past it inside the last
// block are zero-filled in shared memory), a query block entirely in the padding only writes zeros, a warp
// whose 16 rows are all padding skips the products, and padded query rows are written as zeros. GQA: q head
// h reads kv head h / (Hq / Hkv), by index. Causal blocks stop at the block's last query.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "device.cuh"

namespace llm2comp {
namespace {

constexpr int kBlockN = 64;           // keys per step
constexpr int kPad = 8;               // row padding (elements): 16-byte rows, conflict-free ldmatrix
constexpr float kLog2e = 1.4426950408889634f;

template <int HD, int WARPS>
constexpr size_t smem_bytes() {
    // Q (16 rows per warp), and two stages of K and V, all 16-bit.
    return 2 * (16 * WARPS + 4 * kBlockN) * (HD + kPad);
}

// Asynchronously tile[r][:] = rows row0 + r of a [L, HD] slab with row stride `ld` (elements), for rows
// < valid; zeros for the rest, by the block's THREADS threads. 16-byte copies: the binding guarantees aligned
// bases and strides.
template <typename T, int HD, int ROWS, int THREADS>
__device__ __forceinline__ void copy_rows(T* tile, const T* __restrict__ src, int64_t ld, int row0, int valid) {
    constexpr int kVecs = HD / 8;  // 8 16-bit elements per 16 bytes
    for (int i = threadIdx.x; i < ROWS * kVecs; i += THREADS) {
        const int r = i / kVecs, c = (i % kVecs) * 8;
        const bool real = row0 + r < valid;
        cp_async_16(tile + r * (HD + kPad) + c, src + (real ? (row0 + r) * ld + c : 0), real);
    }
}

// A block is WARPS warps of 16 query rows each (4 or 8: 64 or 128 queries sharing each K/V tile).
template <typename T, int HD, bool CAUSAL, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) memory_attention_fwd_kernel(
    const T* __restrict__ q,                // [B, Hq, L, HD], strides sq
    const T* __restrict__ k,                // [B, Hkv, L, HD], strides sk
    const T* __restrict__ v,                // [B, Hkv, L, HD], strides sv
    const int64_t* __restrict__ seq_lens,   // [B]
    T* __restrict__ out,                    // [B, Hq, L, HD] contiguous
    float* __restrict__ lse,                // [B, Hq, L] or nullptr: log2 of each row's sum of exp2(s * scale_log2)
    int64_t Hq, int64_t group, int L, int blocks_m, AttentionStrides sq, AttentionStrides sk, AttentionStrides sv,
    float scale_log2) {
    constexpr int LD = HD + kPad, NT_S = kBlockN / 8, NT_O = HD / 8, KS_Q = HD / 16, KS_P = kBlockN / 16;
    constexpr int kThreads = 32 * WARPS, kBlockM = 16 * WARPS;
    T* Qs = dynamic_smem<T>();
    T* Ks = Qs + kBlockM * LD;         // [2][kBlockN][LD]
    T* Vs = Ks + 2 * kBlockN * LD;     // [2][kBlockN][LD]

    const int64_t bh = blockIdx.x / blocks_m;
    const int m0 = (blockIdx.x % blocks_m) * kBlockM;
    const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
    // Clamped: the Python API validates 1 <= seq_lens[b] <= L, a direct torch.ops call may not.
    const int seq = static_cast<int>(min(max(seq_lens[b], int64_t(0)), int64_t(L)));
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x / 32;
    T* out_bh = out + bh * int64_t(L) * HD;
    float* lse_bh = lse == nullptr ? nullptr : lse + bh * int64_t(L);

    if (m0 >= seq) {  // all padding: zeros, nothing loaded
        const T zero = from_float<T>(0.0f);
        const int rows = min(kBlockM, L - m0);
        for (int i = threadIdx.x; i < rows * HD; i += kThreads) out_bh[int64_t(m0) * HD + i] = zero;
        if (lse_bh != nullptr && int(threadIdx.x) < rows) lse_bh[m0 + threadIdx.x] = 0.0f;
        return;
    }

    const T* k_bh = k + b * sk.b + hk * sk.h;
    const T* v_bh = v + b * sv.b + hk * sv.h;
    const int n_end = CAUSAL ? min(seq, m0 + kBlockM) : seq;
    // Group 0: Q and the first key block.
    copy_rows<T, HD, kBlockM, kThreads>(Qs, q + b * sq.b + h * sq.h, sq.l, m0, seq);
    copy_rows<T, HD, kBlockN, kThreads>(Ks, k_bh, sk.l, 0, seq);
    copy_rows<T, HD, kBlockN, kThreads>(Vs, v_bh, sv.l, 0, seq);
    cp_async_commit();

    // ldmatrix row addresses of this lane (see ldmatrix_x4): for Q, 16 rows x 16 columns per k-step; for K,
    // 16 keys x 16 columns (two 8-key S tiles); for V, 16 keys x 16 columns (two 8-column O tiles), transposed.
    const int a_row = lane % 16, a_col = (lane / 16) * 8;
    const int k_row = (lane / 16) * 8 + lane % 8, k_col = ((lane / 8) % 2) * 8;
    const int v_row = ((lane / 8) % 2) * 8 + lane % 8, v_col = (lane / 16) * 8;

    const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    uint32_t qf[KS_Q][4];
    // m: row max of the scaled scores in base 2 (shared by the quad), l: this lane's partial row sum.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float o[NT_O][4];
#pragma unroll
    for (int n = 0; n < NT_O; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

    for (int n0 = 0, stage = 0; n0 < n_end; n0 += kBlockN, stage ^= 1) {
        // Prefetch the next key block into the other stage (freed by the barrier at the end of the last step).
        const bool prefetch = n0 + kBlockN < n_end;
        if (prefetch) {
            copy_rows<T, HD, kBlockN, kThreads>(Ks + (stage ^ 1) * kBlockN * LD, k_bh, sk.l, n0 + kBlockN, seq);
            copy_rows<T, HD, kBlockN, kThreads>(Vs + (stage ^ 1) * kBlockN * LD, v_bh, sv.l, n0 + kBlockN, seq);
            cp_async_commit();
            cp_async_wait<1>();  // this step's block has landed, the prefetch may still fly
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        // A warp whose 16 rows are all padding computes nothing: its o and l stay 0, and it writes zeros.
        if (m0 + warp * 16 < seq) {
            if (n0 == 0) {
#pragma unroll
                for (int ks = 0; ks < KS_Q; ++ks) {
                    ldmatrix_x4<false>(qf[ks], Qs + (warp * 16 + a_row) * LD + ks * 16 + a_col);
                }
            }
            const T* Kt = Ks + stage * kBlockN * LD;
            const T* Vt = Vs + stage * kBlockN * LD;

            float s[NT_S][4];
#pragma unroll
            for (int n = 0; n < NT_S; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS_Q; ++ks) {  // S tiles 2j, 2j + 1: keys 16j .. 16j + 15, rows of K
                mma_tile_pairs<T, false>(s, qf[ks], Kt + k_row * LD + ks * 16 + k_col, 16 * LD);
            }

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
            // P in the inputs' dtype, as A fragments: 16-key step j is S tiles 2j (columns 0..7) and 2j + 1.
            uint32_t pf[KS_P][4];
#pragma unroll
            for (int n = 0; n < NT_S; ++n) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const float p0 = exp2f(s[n][2 * i] - m[i]), p1 = exp2f(s[n][2 * i + 1] - m[i]);
                    l[i] += p0 + p1;
                    pf[n / 2][2 * (n % 2) + i] = pack2(from_float<T>(p0), from_float<T>(p1));
                }
            }
#pragma unroll
            for (int ks = 0; ks < KS_P; ++ks) {  // O tiles 2j, 2j + 1: columns 16j .. 16j + 15 of V
                mma_tile_pairs<T, true>(o, pf[ks], Vt + (ks * 16 + v_row) * LD + v_col, 16);
            }
        }
        __syncthreads();  // every warp is done with this stage before the next step prefetches into it
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float total = quad_sum(l[i]);  // before the branch: the shuffle needs all 32 lanes
        const int row = rows[i];
        if (row >= L) continue;
        const float inv = row < seq ? 1.0f / total : 0.0f;  // padded rows are exact zeros
        if (lse_bh != nullptr && t == 0) lse_bh[row] = row < seq ? m[i] + log2f(total) : 0.0f;
        T* dst = out_bh + int64_t(row) * HD + 2 * t;
#pragma unroll
        for (int n = 0; n < NT_O; ++n) {
            const T lo = from_float<T>(o[n][2 * i] * inv), hi = from_float<T>(o[n][2 * i + 1] * inv);
            *reinterpret_cast<uint32_t*>(dst + 8 * n) = pack2(lo, hi);
        }
    }
}

// The launcher's arguments, passed as one through the dtype / head dim / causal dispatch.
struct Args {
    const void *q, *k, *v;
    const int64_t* seq_lens;
    void* out;
    float* lse;
    int64_t B, Hq, Hkv, L;
    int warps;
    AttentionStrides sq, sk, sv;
    float scale;
    cudaStream_t stream;
};

template <typename T, int HD, bool CAUSAL, int WARPS>
cudaError_t launch(const Args& a) {
    constexpr size_t bytes = smem_bytes<HD, WARPS>();
    auto kernel = memory_attention_fwd_kernel<T, HD, CAUSAL, WARPS>;
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear it, or the next launch of any op would report it as its own
        return err;
    }
    constexpr int kBlockM = 16 * WARPS;
    const int blocks_m = static_cast<int>((a.L + kBlockM - 1) / kBlockM);
    const dim3 grid(static_cast<unsigned>(a.B * a.Hq * blocks_m));
    return launch_kernel(kernel, grid, 32 * WARPS, bytes, a.stream, static_cast<const T*>(a.q),
                         static_cast<const T*>(a.k), static_cast<const T*>(a.v), a.seq_lens, static_cast<T*>(a.out),
                         a.lse, a.Hq, a.Hq / a.Hkv, static_cast<int>(a.L), blocks_m, a.sq, a.sk, a.sv,
                         a.scale * kLog2e);
}

template <typename T, int HD>
cudaError_t dispatch_warps(bool causal, const Args& a) {
    if (a.warps == 4) return causal ? launch<T, HD, true, 4>(a) : launch<T, HD, false, 4>(a);
    if (a.warps == 8) return causal ? launch<T, HD, true, 8>(a) : launch<T, HD, false, 8>(a);
    return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch(int64_t head_dim, bool causal, const Args& a) {
    if (head_dim == 64) return dispatch_warps<T, 64>(causal, a);
    if (head_dim == 128) return dispatch_warps<T, 128>(causal, a);
    return cudaErrorInvalidValue;
}

}  // namespace

size_t memory_attention_smem_bytes(int64_t head_dim, int block_warps) {
    const bool eight = block_warps == 8;
    if (head_dim == 64) return eight ? smem_bytes<64, 8>() : smem_bytes<64, 4>();
    return eight ? smem_bytes<128, 8>() : smem_bytes<128, 4>();
}

cudaError_t memory_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const int64_t* seq_lens,
                                 void* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t L,
                                 int64_t head_dim, AttentionStrides sq, AttentionStrides sk, AttentionStrides sv,
                                 bool causal, float scale, int block_warps, cudaStream_t stream) {
    const Args a{q, k, v, seq_lens, out, lse, B, Hq, Hkv, L, block_warps, sq, sk, sv, scale, stream};
    switch (dtype) {
        case DType::kFloat16: return dispatch<__half>(head_dim, causal, a);
        case DType::kBFloat16: return dispatch<__nv_bfloat16>(head_dim, causal, a);
        case DType::kFloat32: break;
    }
    return cudaErrorInvalidValue;
}

}  // namespace llm2comp
