// contrastive_loss (InfoNCE): the fused kernels around the similarity GEMMs, which run on cuBLAS.
//
// The binding goes through the docs in chunks (`contrastive_loss_doc_chunk`) and has cuBLAS compute each
// chunk's fp32 block of raw dot products; these kernels do everything else, in one pass over a block:
// - block_stats: per row of a block, the softmax statistics in base 2, the max of x = s log2(e) / T and the
//   sum of exp2(x - max), kept apart so that the loss (max - x_pos) + log2(sum) is exact when the positive is
//   the largest logit; merged online into the statistics of the previous chunks, and (if asked) x at one
//   target column (the row statistics of a queries x docs block).
// - col_stats: the same statistics per column of that block, which holds every query: complete column
//   statistics of the chunk's docs (symmetric), from the very logits the row pass read.
// - block_dlogits: the logit gradient dS of a queries x docs block, in the inputs' dtype, the operand of the
//   two gradient GEMMs (dq += dS . docs, dd = dS^T . queries) that follow on cuBLAS.
// - finalize: per-query losses from the statistics.
// The backward's softmax weights (w_row, w_col) are two torch ops in the binding.
// Extra memory: one chunk's blocks (about kWorkspaceBytes) besides O(B + N) statistics; never [B, N].
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "launchers.h"
#include "device.cuh"

namespace llm2comp {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWorkspaceBytes = int64_t(128) << 20;
constexpr int64_t kChunkMultiple = 256;
constexpr float kLn2 = 0.6931471805599453f;

// (m, l) <- the statistics of the union of two sets given by (max, sum of exp2(x - max)); an empty set is
// (-inf, 0).
__device__ __forceinline__ void merge_stats(float& m, float& l, float m2, float l2) {
    const float m_new = fmaxf(m, m2);
    if (m_new == -INFINITY) return;  // both empty
    l = l * exp2f(m - m_new) + l2 * exp2f(m2 - m_new);
    m = m_new;
}

// (m, l) <- the statistics with one more element x.
__device__ __forceinline__ void add_stat(float& m, float& l, float x) {
    if (x > m) {
        l = l * exp2f(m - x) + 1.0f;
        m = x;
    } else {
        l += exp2f(x - m);
    }
}

// One block per row: its threads stride over the columns (consecutive threads, consecutive floats), each
// keeping online statistics, then the warps' and the block's are merged in a fixed order. A block per row
// rather than a warp: rows are long (a chunk of docs, thousands of columns).
__global__ void __launch_bounds__(kThreads) contrastive_block_stats_kernel(
    const float* __restrict__ logits,      // [rows, cols] raw dot products
    int64_t cols, int64_t col0, float scale_log2, bool first,
    float2* __restrict__ stats,            // [rows] (max, sum), merged into unless `first`
    const int64_t* __restrict__ target,    // [rows] global column whose x is saved, or nullptr
    float* __restrict__ target_logit) {    // [rows], written when the target column is in this block
    __shared__ float2 warp_stats[kWarps];
    const int64_t row = blockIdx.x;
    const float* x_row = logits + row * cols;
    float m = -INFINITY, l = 0.0f;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) add_stat(m, l, x_row[j] * scale_log2);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float l2 = __shfl_xor_sync(0xffffffffu, l, offset);
        merge_stats(m, l, m2, l2);
    }
    // Every lane now holds its warp's statistics (up to the rounding order); lane 0's are the ones used.
    if ((threadIdx.x & 31) == 0) warp_stats[threadIdx.x / 32] = make_float2(m, l);
    __syncthreads();
    if (threadIdx.x != 0) return;
    m = -INFINITY;
    l = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) merge_stats(m, l, warp_stats[w].x, warp_stats[w].y);
    if (!first) {
        const float2 previous = stats[row];
        merge_stats(m, l, previous.x, previous.y);
    }
    stats[row] = make_float2(m, l);
    if (target != nullptr) {
        const int64_t c = target[row] - col0;
        // The same product as in the max, so max - x_pos is exactly 0 when the positive is the largest.
        if (c >= 0 && c < cols) target_logit[row] = x_row[c] * scale_log2;
    }
}

// Column statistics of a [rows, cols] block: one block per kColsPerBlock columns. Thread t reads column
// t % kColsPerBlock of rows t / kColsPerBlock + k * kRowLanes, so each warp reads whole 32-byte sectors; the
// kRowLanes partial statistics of a column are merged in a fixed order (within warps by shuffles, then across
// warps through shared memory).
constexpr int kColsPerBlock = 8;
constexpr int kRowLanes = kThreads / kColsPerBlock;

__global__ void __launch_bounds__(kThreads) contrastive_col_stats_kernel(
    const float* __restrict__ logits,      // [rows, cols] raw dot products
    int64_t rows, int64_t cols, float scale_log2,
    float2* __restrict__ stats) {          // [cols] (max, sum), overwritten
    __shared__ float2 warp_stats[kWarps][kColsPerBlock];
    const int c = threadIdx.x % kColsPerBlock;
    const int64_t col = int64_t(blockIdx.x) * kColsPerBlock + c;
    float m = -INFINITY, l = 0.0f;
    if (col < cols) {
#pragma unroll 8
        for (int64_t i = threadIdx.x / kColsPerBlock; i < rows; i += kRowLanes) {
            add_stat(m, l, logits[i * cols + col] * scale_log2);
        }
    }
    // Lanes c, c + 8, c + 16 and c + 24 of a warp hold the same column.
#pragma unroll
    for (int offset = 16; offset >= kColsPerBlock; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
        const float l2 = __shfl_xor_sync(0xffffffffu, l, offset);
        merge_stats(m, l, m2, l2);
    }
    const int lane = threadIdx.x % 32;
    if (lane < kColsPerBlock) warp_stats[threadIdx.x / 32][lane] = make_float2(m, l);
    __syncthreads();
    if (threadIdx.x >= kColsPerBlock || col >= cols) return;
    m = -INFINITY;
    l = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) merge_stats(m, l, warp_stats[w][c].x, warp_stats[w][c].y);
    stats[col] = make_float2(m, l);
}

// dS(i, j) = w_row[i] softmax_row(i, j) + w_col[j] softmax_col(i, j) - g[i] [j == labels[i]] for the
// docs col0 .. col0 + cols, softmax_row = exp2(x - max_i) / sum_i (softmax_col likewise from the column
// statistics, symmetric only). One block per query row. `dlogits` may alias `logits` (float inputs):
// each element is read, then written, by the same thread.
template <typename T>
__global__ void __launch_bounds__(kThreads) contrastive_block_dlogits_kernel(
    const float* logits,                   // [B, cols] raw dot products
    T* dlogits,                            // [B, cols]
    int64_t cols, int64_t col0, float scale_log2,
    const float2* __restrict__ row_stats,  // [B]
    const float* __restrict__ w_row,       // [B]
    const float2* __restrict__ col_stats,  // [N], or nullptr
    const float* __restrict__ w_col,       // [N] (symmetric only)
    const int64_t* __restrict__ labels,    // [B]
    const float* __restrict__ grad_loss) { // [B]
    const int64_t row = blockIdx.x;
    const float2 rs = row_stats[row];
    const float row_weight = w_row[row] / rs.y;
    const int64_t target = labels[row] - col0;
    const float g = grad_loss[row];
    const float* x_row = logits + row * cols;
    T* out_row = dlogits + row * cols;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
        const float x = x_row[j] * scale_log2;
        float ds = row_weight * exp2f(x - rs.x);  // x <= max: the same product as in the forward's max
        if (col_stats != nullptr) {
            const float2 cs = col_stats[col0 + j];
            ds += w_col[col0 + j] / cs.y * exp2f(x - cs.x);
        }
        if (j == target) ds -= g;
        // 1/T is applied by the GEMMs, in fp32: |dS| <= |g| stays in fp16 range under loss scaling, dS/T may not.
        out_row[j] = from_float<T>(ds);
    }
}

// Per-query loss from the row (and column) statistics and the positive logit.
// (max - pos) is exact (0 when the positive is the largest logit); log2(sum) carries the small rest.
// A label outside [0, N) gives NaN: the Python API rejects it, a direct torch.ops call may not.
__global__ void contrastive_loss_finalize_kernel(const float2* __restrict__ row_stats,
                                                 const float2* __restrict__ col_stats, const int64_t* __restrict__ labels,
                                                 float* loss, int64_t B, int64_t N) {  // loss: pos (log2 units) on entry
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= B) return;
    const int64_t label = labels[i];
    if (label < 0 || label >= N) {
        loss[i] = kNaN;
        return;
    }
    const float pos = loss[i];
    const float2 r = row_stats[i];
    float out = (r.x - pos) + log2f(r.y);
    if (col_stats != nullptr) {
        const float2 c = col_stats[label];
        out = 0.5f * (out + (c.x - pos) + log2f(c.y));
    }
    loss[i] = out * kLn2;
}

unsigned blocks_1d(int64_t n, int64_t per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

template <typename T>
cudaError_t launch_dlogits(const float* logits, void* dlogits, int64_t B, int64_t cols, int64_t col0, float scale_log2,
                           const float* row_stats, const float* w_row, const float* col_stats, const float* w_col,
                           const int64_t* labels, const float* grad_loss, cudaStream_t stream) {
    return launch_kernel(contrastive_block_dlogits_kernel<T>, static_cast<unsigned>(B), kThreads, 0, stream, logits,
                         static_cast<T*>(dlogits), cols, col0, scale_log2, reinterpret_cast<const float2*>(row_stats),
                         w_row, reinterpret_cast<const float2*>(col_stats), w_col, labels, grad_loss);
}

}  // namespace

int64_t contrastive_loss_doc_chunk(int64_t B, int64_t N, int64_t bytes_per_logit) {
    const int64_t fit = kWorkspaceBytes / std::max<int64_t>(1, B * bytes_per_logit) / kChunkMultiple * kChunkMultiple;
    return std::min(N, std::max(kChunkMultiple, fit));
}

cudaError_t contrastive_loss_block_stats(const float* logits, int64_t rows, int64_t cols, int64_t col0,
                                         float scale_log2, bool first, float* stats, const int64_t* target,
                                         float* target_logit, cudaStream_t stream) {
    return launch_kernel(contrastive_block_stats_kernel, static_cast<unsigned>(rows), kThreads, 0, stream, logits, cols,
                         col0, scale_log2, first, reinterpret_cast<float2*>(stats), target, target_logit);
}

cudaError_t contrastive_loss_col_stats(const float* logits, int64_t rows, int64_t cols, float scale_log2,
                                       float* stats, cudaStream_t stream) {
    return launch_kernel(contrastive_col_stats_kernel, blocks_1d(cols, kColsPerBlock), kThreads, 0, stream, logits,
                         rows, cols, scale_log2, reinterpret_cast<float2*>(stats));
}

cudaError_t contrastive_loss_finalize(const float* row_stats, const float* col_stats, const int64_t* labels,
                                      float* loss, int64_t B, int64_t N, cudaStream_t stream) {
    return launch_kernel(contrastive_loss_finalize_kernel, blocks_1d(B, 256), 256, 0, stream,
                         reinterpret_cast<const float2*>(row_stats), reinterpret_cast<const float2*>(col_stats), labels,
                         loss, B, N);
}

cudaError_t contrastive_loss_block_dlogits(DType dtype, const float* logits, void* dlogits, int64_t B, int64_t cols,
                                           int64_t col0, float scale_log2, const float* row_stats, const float* w_row,
                                           const float* col_stats, const float* w_col, const int64_t* labels,
                                           const float* grad_loss, cudaStream_t stream) {
    switch (dtype) {
        case DType::kFloat32:
            return launch_dlogits<float>(logits, dlogits, B, cols, col0, scale_log2, row_stats, w_row, col_stats, w_col,
                                         labels, grad_loss, stream);
        case DType::kFloat16:
            return launch_dlogits<__half>(logits, dlogits, B, cols, col0, scale_log2, row_stats, w_row, col_stats,
                                          w_col, labels, grad_loss, stream);
        case DType::kBFloat16:
            return launch_dlogits<__nv_bfloat16>(logits, dlogits, B, cols, col0, scale_log2, row_stats, w_row,
                                                 col_stats, w_col, labels, grad_loss, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace llm2comp
