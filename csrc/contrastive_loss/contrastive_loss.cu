// contrastive_loss (InfoNCE) forward and backward without the [B, N] logits.
//
// Both directions reuse one pair of kernels on an "A side" (the rows a block owns) and a "B side" (the
// rows it streams): s(a, b) = <A_a, B_b> / temperature.
// - stats kernel: per A row, the softmax statistics over all B rows in base 2, online over 64-row B tiles:
//   the max of x = s log2(e) and the sum of exp2(x - max), kept apart so that the loss (max - x_pos) +
//   log2(sum) is exact when the positive is the largest logit (and, if asked, x at one target column).
//   Queries as A gives the row statistics, docs as A the column statistics.
// - grad kernel: per A row block, recompute each S tile, form dS in registers, and accumulate
//   dA += dS . B into an fp32 buffer the block owns exclusively (no atomics). Queries as A gives dq,
//   docs as A gives dd.
// Extra memory is O(B + N) besides the gradients themselves.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"
#include "mma_tile.cuh"

namespace llm2comp {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockA = 16 * kWarps;  // A rows per block: a 16-row strip per warp
constexpr int kBlockB = 64;           // B rows per tile
constexpr int kNT = kBlockB / 8;      // 8-column accumulator tiles per warp strip
constexpr int kDimPad = 64;           // gradient buffers' D is padded to this
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// D chunk per step: 64 for 16-bit types (tensor-core k steps of 16), 32 for float so that the fp32
// tiles fit the 48 KB of static shared memory.
template <typename T>
__host__ __device__ constexpr int chunk() { return kIsHalf<T> ? 64 : 32; }
template <typename T>
__host__ __device__ constexpr int pad() { return kIsHalf<T> ? 8 : 4; }  // row padding against bank conflicts, keeps rows 16-byte aligned

// tile[r][c] = src[row0 + r][col0 + c] for r < ROWS, c < COLS; zero outside [rows, cols).
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* tile, int ld, const T* __restrict__ src, int64_t row0, int64_t rows,
                                          int64_t col0, int64_t cols) {
    for (int i = threadIdx.x; i < ROWS * COLS; i += kThreads) {
        const int r = i / COLS, c = i % COLS;
        const int64_t gr = row0 + r, gc = col0 + c;
        tile[r * ld + c] = (gr < rows && gc < cols) ? src[gr * cols + gc] : from_float<T>(0.0f);
    }
}

// s[n] = <A strip, B tile rows>, over all of D in chunks. Leaves smem free for reuse by the caller only
// after a __syncthreads.
template <typename T>
__device__ __forceinline__ void tile_logits(float (&s)[kNT][4], T* As, T* Bs, const T* __restrict__ A, int64_t nA,
                                            const T* __restrict__ Bm, int64_t nB, int64_t D, int64_t a0,
                                            int64_t b0) {
    constexpr int C = chunk<T>(), LD = C + pad<T>();
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int n = 0; n < kNT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    for (int64_t k0 = 0; k0 < D; k0 += C) {
        __syncthreads();  // the previous chunk (or the caller's previous use of As/Bs) is consumed
        load_tile<T, kBlockA, C>(As, LD, A, a0, nA, k0, D);
        load_tile<T, kBlockB, C>(Bs, LD, Bm, b0, nB, k0, D);
        __syncthreads();
        warp_mma_abt<T, kNT>(s, As + warp * 16 * LD, LD, Bs, LD, C);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) contrastive_stats_kernel(
    const T* __restrict__ A,              // [nA, D]
    const T* __restrict__ Bm,             // [nB, D]
    const int64_t* __restrict__ target,   // [nA] column whose logit is saved, or nullptr
    float2* __restrict__ stats,           // [nA] (max_b x(a, b), sum_b exp2(x(a, b) - max)), x = s log2(e)
    float* __restrict__ target_logit,     // [nA] x(a, target[a]) (log2 units, bitwise the value in the max), or nullptr
    int64_t nA, int64_t nB, int64_t D, float inv_temp) {
    constexpr int C = chunk<T>(), LD = C + pad<T>();
    __shared__ __align__(16) T As[kBlockA * LD];
    __shared__ __align__(16) T Bs[kBlockB * LD];
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x / 32;
    const int64_t a0 = int64_t(blockIdx.x) * kBlockA;
    const int64_t rows[2] = {a0 + warp * 16 + g, a0 + warp * 16 + g + 8};
    int64_t tgt[2] = {-1, -1};
    if (target != nullptr) {
        for (int i = 0; i < 2; ++i) tgt[i] = rows[i] < nA ? target[rows[i]] : -1;
    }
    const float scale_log2 = inv_temp * kLog2e;
    // Online logsumexp in base 2: m is the row max (shared by the quad), l this lane's partial sum.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    float s[kNT][4];
    for (int64_t b0 = 0; b0 < nB; b0 += kBlockB) {
        tile_logits<T>(s, As, Bs, A, nA, Bm, nB, D, a0, b0);
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1;
                const int64_t col = b0 + 8 * n + 2 * t + (e & 1);
                s[n][e] = col < nB ? s[n][e] * scale_log2 : -INFINITY;
                if (col == tgt[i]) target_logit[rows[i]] = s[n][e];
                tile_max[i] = fmaxf(tile_max[i], s[n][e]);
            }
        }
        // Column b0 < nB is real, so the quad max of the first tile, and every later one, is finite.
        float alpha[2];
        for (int i = 0; i < 2; ++i) {
            const float m_new = fmaxf(m[i], quad_max(tile_max[i]));
            alpha[i] = exp2f(m[i] - m_new);
            m[i] = m_new;
            l[i] *= alpha[i];
        }
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) l[e >> 1] += exp2f(s[n][e] - m[e >> 1]);
        }
    }
    for (int i = 0; i < 2; ++i) {
        const float total = quad_sum(l[i]);
        if (t == 0 && rows[i] < nA) stats[rows[i]] = make_float2(m[i], total);
    }
}

// dS(a, b) = inv_temp * (wa[a] * softmax_a(a, b) + wb[b] * softmax_b(a, b) - target term), softmax_a =
// exp2(x - max_a[a]) / sum_a[a] from stats_a (softmax_b likewise from stats_b), where the target term is
// coef[a] * [b == label[a]] (TARGET_ON_A) or coef[b] * [a == label[b]]. With queries as A: wa = row
// weights, stats_a = row statistics, wb/stats_b = column weights/statistics (symmetric only). With docs
// as A the roles swap and the target sits on the B side.
template <typename T, bool TARGET_ON_A>
__global__ void __launch_bounds__(kThreads, 1) contrastive_grad_kernel(
    const T* __restrict__ A,              // [nA, D]
    const T* __restrict__ Bm,             // [nB, D]
    const float2* __restrict__ stats_a,   // [nA] (max, sum) of the A-side softmax, or nullptr
    const float* __restrict__ wa,         // [nA], or nullptr
    const float2* __restrict__ stats_b,   // [nB] (max, sum) of the B-side softmax, or nullptr
    const float* __restrict__ wb,         // [nB], or nullptr
    const int64_t* __restrict__ label,    // [nA] if TARGET_ON_A else [nB]
    const float* __restrict__ coef,       // same length as label
    float* __restrict__ dA,               // [padded rows, Dp] fp32, accumulated into
    int64_t nA, int64_t nB, int64_t D, int64_t Dp, float inv_temp) {
    constexpr int C = chunk<T>(), LD = C + pad<T>(), LDP = kBlockB + pad<T>();
    __shared__ __align__(16) T As[kBlockA * LD];
    __shared__ __align__(16) T Bs[kBlockB * LD];
    __shared__ __align__(16) T Ps[kWarps * 16 * LDP];  // each warp's dS strip, operand of dS . B
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x / 32;
    const int64_t a0 = int64_t(blockIdx.x) * kBlockA;
    const int64_t rows[2] = {a0 + warp * 16 + g, a0 + warp * 16 + g + 8};
    const float scale_log2 = inv_temp * kLog2e;
    float la[2], wra[2], coef_a[2] = {0.0f, 0.0f};
    int64_t label_a[2] = {-1, -1};
    for (int i = 0; i < 2; ++i) {
        const bool real = rows[i] < nA;
        const float2 st = (real && wa != nullptr) ? stats_a[rows[i]] : make_float2(0.0f, 1.0f);
        la[i] = st.x;                                                  // softmax = exp2(x - max) / sum
        wra[i] = (real && wa != nullptr) ? wa[rows[i]] / st.y : 0.0f;
        if (TARGET_ON_A && real) {
            label_a[i] = label[rows[i]];
            coef_a[i] = coef[rows[i]];
        }
    }
    T* Pw = Ps + warp * 16 * LDP;
    float s[kNT][4];
    for (int64_t b0 = 0; b0 < nB; b0 += kBlockB) {
        tile_logits<T>(s, As, Bs, A, nA, Bm, nB, D, a0, b0);
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1;
                const int c = 8 * n + 2 * t + (e & 1);
                const int64_t col = b0 + c;
                float ds = 0.0f;
                if (col < nB && rows[i] < nA) {
                    const float x = s[n][e] * scale_log2;
                    if (wa != nullptr) ds = wra[i] * exp2f(x - la[i]);  // x <= max (same tiles, same sums)
                    if (stats_b != nullptr) {
                        const float2 sb = stats_b[col];
                        ds += wb[col] / sb.y * exp2f(x - sb.x);
                    }
                    if (TARGET_ON_A) {
                        if (col == label_a[i]) ds -= coef_a[i];
                    } else if (label[col] == rows[i]) {
                        ds -= coef[col];
                    }
                }
                // 1/T is applied in fp32 below: |dS| <= |g| stays in fp16 range under loss scaling, dS/T may not.
                Pw[(g + 8 * i) * LDP + c] = from_float<T>(ds);
            }
        }
        // dA[strip, c0:c0+C] += dS . B[b0:b0+64, c0:c0+C], one D chunk at a time.
        for (int64_t c0 = 0; c0 < D; c0 += C) {
            __syncthreads();  // Bs free (and every warp's Pw written before any reads it: Pw is per warp)
            load_tile<T, kBlockB, C>(Bs, LD, Bm, b0, nB, c0, D);
            __syncthreads();
            float acc[C / 8][4];
#pragma unroll
            for (int n = 0; n < C / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
            warp_mma_ab<T, C / 8>(acc, Pw, LDP, Bs, LD, kBlockB);
#pragma unroll
            for (int n = 0; n < C / 8; ++n) {
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    float2* dst = reinterpret_cast<float2*>(dA + rows[i] * Dp + c0 + 8 * n + 2 * t);
                    float2 cur = *dst;
                    cur.x += acc[n][2 * i] * inv_temp;
                    cur.y += acc[n][2 * i + 1] * inv_temp;
                    *dst = cur;
                }
            }
        }
    }
}

// Per-query loss from the row (and column) statistics and the positive logit.
// (max - pos) is exact (0 when the positive is the largest logit); log2(sum) carries the small rest.
__global__ void contrastive_loss_finalize_kernel(const float2* __restrict__ row_stats,
                                                 const float2* __restrict__ col_stats, const int64_t* __restrict__ labels,
                                                 float* loss, int64_t B) {  // loss holds pos (log2 units) on entry
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= B) return;
    const float pos = loss[i];
    const float2 r = row_stats[i];
    float out = (r.x - pos) + log2f(r.y);
    if (col_stats != nullptr) {
        const float2 c = col_stats[labels[i]];
        out = 0.5f * (out + (c.x - pos) + log2f(c.y));
    }
    loss[i] = out * kLn2;
}

// Softmax weights of the backward from the per-query upstream gradient g: the row term carries g
// (halved when symmetric), the column term of doc j carries half the g of every query whose positive
// is j (zeroed beforehand; atomics because labels may repeat).
__global__ void contrastive_loss_weights_kernel(const float* __restrict__ g, const int64_t* __restrict__ labels,
                                                float* __restrict__ w_row, float* __restrict__ w_col, int64_t B) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= B) return;
    if (w_col == nullptr) {
        w_row[i] = g[i];
    } else {
        w_row[i] = 0.5f * g[i];
        atomicAdd(w_col + labels[i], 0.5f * g[i]);
    }
}

unsigned blocks_for(int64_t rows) { return static_cast<unsigned>((rows + kBlockA - 1) / kBlockA); }
unsigned blocks_1d(int64_t n) { return static_cast<unsigned>((n + 255) / 256); }

template <typename T>
cudaError_t launch_fwd(const void* queries, const void* docs, const int64_t* labels, float* loss, float* row_stats,
                       float* col_stats, int64_t B, int64_t N, int64_t D, float temperature, bool symmetric,
                       cudaStream_t stream) {
    float2* rs = reinterpret_cast<float2*>(row_stats);
    float2* cs = symmetric ? reinterpret_cast<float2*>(col_stats) : nullptr;
    auto q = static_cast<const T*>(queries);
    auto d = static_cast<const T*>(docs);
    const float inv_temp = 1.0f / temperature;
    // The positive logits go to `loss` first; finalize turns them into losses in place (same index).
    contrastive_stats_kernel<T><<<blocks_for(B), kThreads, 0, stream>>>(q, d, labels, rs, loss, B, N, D, inv_temp);
    if (symmetric) {
        contrastive_stats_kernel<T><<<blocks_for(N), kThreads, 0, stream>>>(d, q, nullptr, cs, nullptr, N, B, D, inv_temp);
    }
    contrastive_loss_finalize_kernel<<<blocks_1d(B), 256, 0, stream>>>(rs, cs, labels, loss, B);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const float* grad_loss, const void* queries, const void* docs, const int64_t* labels,
                       const float* row_stats, const float* col_stats, float* dq_acc, float* dd_acc, float* work,
                       int64_t B, int64_t N, int64_t D, float temperature, bool symmetric, cudaStream_t stream) {
    const float2* rs = reinterpret_cast<const float2*>(row_stats);
    const float2* cs = symmetric ? reinterpret_cast<const float2*>(col_stats) : nullptr;
    auto q = static_cast<const T*>(queries);
    auto d = static_cast<const T*>(docs);
    const float inv_temp = 1.0f / temperature;
    const int64_t Dp = contrastive_loss_padded_dim(D);
    float* w_row = work;                               // [B]
    float* w_col = symmetric ? work + B : nullptr;     // [N], zeroed by the caller
    contrastive_loss_weights_kernel<<<blocks_1d(B), 256, 0, stream>>>(grad_loss, labels, w_row, w_col, B);
    // dq: queries as A; the target (doc labels[i]) is indexed by the A row.
    contrastive_grad_kernel<T, true><<<blocks_for(B), kThreads, 0, stream>>>(
        q, d, rs, w_row, cs, w_col, labels, grad_loss, dq_acc, B, N, D, Dp, inv_temp);
    // dd: docs as A; the row softmax (weights w_row) is now the B side and the target is indexed by the
    // B row (query i targets doc labels[i]). Without the symmetric loss there is no A-side (column) term.
    if (symmetric) {
        contrastive_grad_kernel<T, false><<<blocks_for(N), kThreads, 0, stream>>>(
            d, q, cs, w_col, rs, w_row, labels, grad_loss, dd_acc, N, B, D, Dp, inv_temp);
    } else {
        contrastive_grad_kernel<T, false><<<blocks_for(N), kThreads, 0, stream>>>(
            d, q, nullptr, nullptr, rs, w_row, labels, grad_loss, dd_acc, N, B, D, Dp, inv_temp);
    }
    return cudaGetLastError();
}

}  // namespace

int64_t contrastive_loss_padded_rows(int64_t rows) { return (rows + kBlockA - 1) / kBlockA * kBlockA; }
int64_t contrastive_loss_padded_dim(int64_t D) { return (D + kDimPad - 1) / kDimPad * kDimPad; }

cudaError_t contrastive_loss_fwd(DType dtype, const void* queries, const void* docs, const int64_t* labels,
                                 float* loss, float* row_stats, float* col_stats, int64_t B, int64_t N, int64_t D,
                                 float temperature, bool symmetric, cudaStream_t stream) {
    switch (dtype) {
        case DType::kFloat32:
            return launch_fwd<float>(queries, docs, labels, loss, row_stats, col_stats, B, N, D, temperature, symmetric,
                                     stream);
        case DType::kFloat16:
            return launch_fwd<__half>(queries, docs, labels, loss, row_stats, col_stats, B, N, D, temperature, symmetric,
                                      stream);
        case DType::kBFloat16:
            return launch_fwd<__nv_bfloat16>(queries, docs, labels, loss, row_stats, col_stats, B, N, D, temperature,
                                             symmetric, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t contrastive_loss_bwd(DType dtype, const float* grad_loss, const void* queries, const void* docs,
                                 const int64_t* labels, const float* row_stats, const float* col_stats, float* dq_acc,
                                 float* dd_acc, float* work, int64_t B, int64_t N, int64_t D, float temperature,
                                 bool symmetric, cudaStream_t stream) {
    switch (dtype) {
        case DType::kFloat32:
            return launch_bwd<float>(grad_loss, queries, docs, labels, row_stats, col_stats, dq_acc, dd_acc, work, B, N,
                                     D, temperature, symmetric, stream);
        case DType::kFloat16:
            return launch_bwd<__half>(grad_loss, queries, docs, labels, row_stats, col_stats, dq_acc, dd_acc, work, B, N,
                                      D, temperature, symmetric, stream);
        case DType::kBFloat16:
            return launch_bwd<__nv_bfloat16>(grad_loss, queries, docs, labels, row_stats, col_stats, dq_acc, dd_acc,
                                             work, B, N, D, temperature, symmetric, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace llm2comp
