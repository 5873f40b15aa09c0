// C entry points into the csrc/ launchers, compiled for CPU emulation, for the tests (through ctypes).
// Each returns 0, or -1 with the message in emu_last_error(): an emulation check that failed, or the
// launcher's own cudaError_t.
#include <string>

#include "cpu_emulation.h"
#include "launchers.h"

namespace llm2comp {
cudaError_t launch_faulty(int bug, float* buffer, float salt);  // faulty_kernels.cpp
}

namespace {

std::string last_error;

template <typename F>
int guarded(F&& launch) {
    try {
        const cudaError_t err = launch();
        if (err == cudaSuccess) return 0;
        last_error = "launcher returned cudaError_t " + std::to_string(int(err));
    } catch (const std::exception& e) {
        last_error = e.what();
    }
    return -1;
}

llm2comp::DType dtype_of(int code) { return static_cast<llm2comp::DType>(code); }

}  // namespace

extern "C" {

const char* emu_last_error() { return last_error.c_str(); }

int emu_set_schedule(int order, uint64_t seed, bool land_copies_at_issue) {
    return guarded([&] {
        llm2comp::emu::set_schedule(order, seed, land_copies_at_issue);
        return cudaSuccess;
    });
}

int64_t emu_set_device_dynamic_smem(int64_t bytes) {
    return static_cast<int64_t>(llm2comp::emu::set_device_dynamic_smem(static_cast<size_t>(bytes)));
}

// counts[0..3] = emu::Counts since the last call: ldmatrix phases, their wavefronts, mma instructions,
// cp.async bytes.
void emu_take_counts(int64_t* counts) {
    const llm2comp::emu::Counts c = llm2comp::emu::take_counts();
    counts[0] = c.ldmatrix_phases;
    counts[1] = c.ldmatrix_wavefronts;
    counts[2] = c.mma;
    counts[3] = c.cp_async_bytes;
}

int emu_faulty(int bug, float* buffer, float salt) {
    return guarded([&] { return llm2comp::launch_faulty(bug, buffer, salt); });
}

int emu_span_mean_pool_fwd(int dtype, const void* hidden, const int64_t* start, const int64_t* length, void* out,
                           int64_t B, int64_t L, int64_t D) {
    return guarded([&] { return llm2comp::span_mean_pool_fwd(dtype_of(dtype), hidden, start, length, out, B, L, D, 0); });
}

int emu_span_mean_pool_bwd(int dtype, const void* grad_out, const int64_t* start, const int64_t* length,
                           void* grad_hidden, int64_t B, int64_t L, int64_t D) {
    return guarded(
        [&] { return llm2comp::span_mean_pool_bwd(dtype_of(dtype), grad_out, start, length, grad_hidden, B, L, D, 0); });
}

int64_t emu_contrastive_loss_doc_chunk(int64_t B, int64_t N, int64_t bytes_per_logit) {
    return llm2comp::contrastive_loss_doc_chunk(B, N, bytes_per_logit);
}

int emu_contrastive_loss_block_stats(const float* logits, int64_t rows, int64_t cols, int64_t col0, float scale_log2,
                                     bool first, float* stats, const int64_t* target, float* target_logit) {
    return guarded([&] {
        return llm2comp::contrastive_loss_block_stats(logits, rows, cols, col0, scale_log2, first, stats, target,
                                                      target_logit, 0);
    });
}

int emu_contrastive_loss_col_stats(const float* logits, int64_t rows, int64_t cols, float scale_log2, float* stats) {
    return guarded([&] { return llm2comp::contrastive_loss_col_stats(logits, rows, cols, scale_log2, stats, 0); });
}

int emu_contrastive_loss_finalize(const float* row_stats, const float* col_stats, const int64_t* labels, float* loss,
                                  int64_t B, int64_t N) {
    return guarded([&] { return llm2comp::contrastive_loss_finalize(row_stats, col_stats, labels, loss, B, N, 0); });
}

int emu_contrastive_loss_block_dlogits(int dtype, const float* logits, void* dlogits, int64_t B, int64_t cols,
                                       int64_t col0, float scale_log2, const float* row_stats, const float* w_row,
                                       const float* col_stats, const float* w_col, const int64_t* labels,
                                       const float* grad_loss) {
    return guarded([&] {
        return llm2comp::contrastive_loss_block_dlogits(dtype_of(dtype), logits, dlogits, B, cols, col0, scale_log2,
                                                        row_stats, w_row, col_stats, w_col, labels, grad_loss, 0);
    });
}

// strides: q, k, v as (b, h, l) triples, in elements.
int emu_memory_attention_fwd(int dtype, const void* q, const void* k, const void* v, const int64_t* seq_lens,
                             void* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t head_dim,
                             const int64_t* strides, bool causal, float scale, int block_warps) {
    const llm2comp::AttentionStrides sq{strides[0], strides[1], strides[2]}, sk{strides[3], strides[4], strides[5]},
        sv{strides[6], strides[7], strides[8]};
    return guarded([&] {
        return llm2comp::memory_attention_fwd(dtype_of(dtype), q, k, v, seq_lens, out, lse, B, Hq, Hkv, L, head_dim,
                                              sq, sk, sv, causal, scale, block_warps, 0);
    });
}

}  // extern "C"
