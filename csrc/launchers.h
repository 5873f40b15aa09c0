// Plain C++ entry points of the CUDA kernels: raw device pointers, sizes and a stream, no torch.
// Each returns the launch status (cudaGetLastError) for the binding to turn into an exception.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace llm2comp {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// hidden [B, L, D] contiguous, start/length int64 [B] -> out [B, D] (same dtype), fp32 accumulation.
cudaError_t span_mean_pool_fwd(DType dtype, const void* hidden, const int64_t* start, const int64_t* length,
                               void* out, int64_t B, int64_t L, int64_t D, cudaStream_t stream);

// grad_out [B, D] contiguous -> grad_hidden [B, L, D]: grad_out / length inside the span, 0 elsewhere
// (every element is written, so grad_hidden needs no zeroing).
cudaError_t span_mean_pool_bwd(DType dtype, const void* grad_out, const int64_t* start, const int64_t* length,
                               void* grad_hidden, int64_t B, int64_t L, int64_t D, cudaStream_t stream);

// queries [B, D], docs [N, D] contiguous, labels int64 [B]. Writes fp32 loss [B] (per query, before
// reduction), row stats [B, 2] and, if symmetric, col stats [N, 2]: per row (column) the max of
// x_ij = s_ij * log2(e) and the sum of exp2(x_ij - max), kept apart so that max - x_pos is exact;
// s_ij = <q_i, d_j> / temperature.
cudaError_t contrastive_loss_fwd(DType dtype, const void* queries, const void* docs, const int64_t* labels,
                                 float* loss, float* row_stats, float* col_stats, int64_t B, int64_t N, int64_t D,
                                 float temperature, bool symmetric, cudaStream_t stream);

// Padded fp32 gradient buffers of the backward: rows rounded up to the kernel's row block, columns to
// its D chunk. The binding allocates them zeroed and slices out [B, D] / [N, D].
int64_t contrastive_loss_padded_rows(int64_t rows);
int64_t contrastive_loss_padded_dim(int64_t D);

// grad_loss fp32 [B] (d total / d loss_i). dq_acc [padded_rows(B), padded_dim(D)] and dd_acc
// [padded_rows(N), padded_dim(D)] fp32, zeroed; work fp32 [B + N] scratch.
cudaError_t contrastive_loss_bwd(DType dtype, const float* grad_loss, const void* queries, const void* docs,
                                 const int64_t* labels, const float* row_stats, const float* col_stats, float* dq_acc,
                                 float* dd_acc, float* work, int64_t B, int64_t N, int64_t D, float temperature,
                                 bool symmetric, cudaStream_t stream);

// q [B, Hq, L, d], k/v [B, Hkv, L, d] with any (b, h, l) strides that are multiples of 8 elements,
// unit stride along d and 16-byte aligned base pointers; seq_lens int64 [B]; out [B, Hq, L, d]
// contiguous. dtype float16/bfloat16, head_dim 64 or 128.
struct AttentionStrides {
    int64_t b, h, l;
};
cudaError_t memory_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const int64_t* seq_lens,
                                 void* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t head_dim,
                                 AttentionStrides sq, AttentionStrides sk, AttentionStrides sv, bool causal,
                                 float scale, cudaStream_t stream);

}  // namespace llm2comp
