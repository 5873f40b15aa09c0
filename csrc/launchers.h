// Plain C++ entry points of the CUDA kernels: raw device pointers, sizes and a stream, no torch.
// Each returns the launch status (cudaGetLastError) for the binding to turn into an exception.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace llm2comp {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// hidden [B, L, D] contiguous, start/length int64 [B] -> out [B, D] (same dtype), fp32 accumulation. A row
// whose span breaks 0 <= start, 1 <= length, start + length <= L is NaN (out here, grad_hidden below).
cudaError_t span_mean_pool_fwd(DType dtype, const void* hidden, const int64_t* start, const int64_t* length,
                               void* out, int64_t B, int64_t L, int64_t D, cudaStream_t stream);

// grad_out [B, D] contiguous -> grad_hidden [B, L, D]: grad_out / length inside the span, 0 elsewhere
// (every element is written, so grad_hidden needs no zeroing).
cudaError_t span_mean_pool_bwd(DType dtype, const void* grad_out, const int64_t* start, const int64_t* length,
                               void* grad_hidden, int64_t B, int64_t L, int64_t D, cudaStream_t stream);

// contrastive_loss. The binding computes fp32 blocks of raw dot products with cuBLAS, one chunk of docs at a
// time, and these launchers do the rest. Softmax statistics are float pairs (max, sum) per row, in base 2:
// the max of x = s * scale_log2 (scale_log2 = log2(e) / temperature) and the sum of exp2(x - max).

// Docs per chunk when each logit of a [B, C] block takes `bytes_per_logit` bytes of workspace: C a multiple
// of 256 (at least 256) that keeps the blocks near the kernels' workspace budget, at most N.
int64_t contrastive_loss_doc_chunk(int64_t B, int64_t N, int64_t bytes_per_logit);

// logits fp32 [rows, cols] contiguous, the block of columns col0 .. col0 + cols. Folds it into stats
// fp32 [rows, 2] (overwritten if `first`, else merged with the previous blocks' statistics). If target
// (int64 [rows], global column indices) is given, target_logit[r] = x at column target[r] when it lies in
// this block, bitwise the value that entered the max.
cudaError_t contrastive_loss_block_stats(const float* logits, int64_t rows, int64_t cols, int64_t col0,
                                         float scale_log2, bool first, float* stats, const int64_t* target,
                                         float* target_logit, cudaStream_t stream);

// logits fp32 [rows, cols] contiguous, holding every row (query) of these columns -> stats fp32 [cols, 2], the
// columns' complete statistics (overwritten).
cudaError_t contrastive_loss_col_stats(const float* logits, int64_t rows, int64_t cols, float scale_log2,
                                       float* stats, cudaStream_t stream);

// loss fp32 [B] holds the positive logits x_pos on entry and the per-query losses on exit (NaN where a label
// is outside [0, N)), from row_stats [B, 2] and (symmetric only, else nullptr) col_stats [N, 2].
cudaError_t contrastive_loss_finalize(const float* row_stats, const float* col_stats, const int64_t* labels,
                                      float* loss, int64_t B, int64_t N, cudaStream_t stream);

// dlogits [B, cols] in `dtype` (may alias logits when float32) = the loss gradient w.r.t. the logits of docs
// col0 .. col0 + cols, before the 1/temperature that the gradient GEMMs apply. Weights from grad_loss g fp32
// [B]: w_row [B] = g (g / 2 if symmetric); w_col [N] = the sum of g_i / 2 over the queries i whose label is
// the doc (symmetric only; col_stats and w_col nullptr otherwise).
cudaError_t contrastive_loss_block_dlogits(DType dtype, const float* logits, void* dlogits, int64_t B, int64_t cols,
                                           int64_t col0, float scale_log2, const float* row_stats, const float* w_row,
                                           const float* col_stats, const float* w_col, const int64_t* labels,
                                           const float* grad_loss, cudaStream_t stream);

// q [B, Hq, L, d], k/v [B, Hkv, L, d] with any (b, h, l) strides that are multiples of 8 elements,
// unit stride along d and 16-byte aligned base pointers; seq_lens int64 [B]; out [B, Hq, L, d]
// contiguous; lse fp32 [B, Hq, L] contiguous or nullptr: each row's log2 sum of exp2(scores * scale *
// log2(e)) over the keys it sees (0 for padded rows), what the Triton backward takes. dtype float16/bfloat16,
// head_dim 64 or 128; block_warps 4 or 8: 64 or 128 queries per block (sharing each K/V tile, with half the
// blocks).
struct AttentionStrides {
    int64_t b, h, l;
};
// The dynamic shared memory (bytes) a block of the forward takes; above the device's opt-in limit the launch
// fails (head dim 128 with 8 warps on sm_86/sm_89).
size_t memory_attention_smem_bytes(int64_t head_dim, int block_warps);
cudaError_t memory_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const int64_t* seq_lens,
                                 void* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t L,
                                 int64_t head_dim, AttentionStrides sq, AttentionStrides sk, AttentionStrides sv,
                                 bool causal, float scale, int block_warps, cudaStream_t stream);

}  // namespace llm2comp
