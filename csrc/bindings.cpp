// Torch side of llm2comp_kernels._C, the only file that includes torch.
//
// Layout of csrc/:
//   launchers.h                    plain C++ launchers (raw device pointers, sizes, cudaStream_t)
//   device.cuh                     dtype conversions, the launch, warp-level mma.sync/ldmatrix/cp.async pieces
//   span_mean_pool/*.cu            span mean forward/backward (vectorised, bandwidth-bound)
//   contrastive_loss/*.cu          InfoNCE's fused kernels around cuBLAS similarity GEMMs (online LSE, dS)
//   memory_attention/*.cu          flash-attention forward over right-padded rows, GQA, causal option
//   bindings.cpp                   this file: argument checks, current stream, TORCH_LIBRARY schemas
// The .cu files compile with plain `nvcc -c` (see .ci/compile_cuda.sh). Python wrappers with fake
// kernels and autograd live in llm2comp_kernels/<op>/cuda.py.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "launchers.h"

namespace llm2comp {
namespace {

constexpr double kLog2e = 1.4426950408889634;

#define LLM2COMP_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), OP, ": ", #x " must be a CUDA tensor, got ", (x).device())
#define LLM2COMP_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), OP, ": ", #x " must be contiguous")
#define LLM2COMP_CHECK_DTYPE(x, dt) \
    TORCH_CHECK((x).scalar_type() == (dt), OP, ": ", #x " must be ", (dt), ", got ", (x).scalar_type())
#define LLM2COMP_CHECK_DIM(x, n) \
    TORCH_CHECK((x).dim() == (n), OP, ": ", #x " must have ", num(n), " dims, got ", num((x).dim()))
#define LLM2COMP_CHECK_SIZE(x, i, n) \
    TORCH_CHECK((x).size(i) == (n), OP, ": ", #x ".size(", num(i), ") must be ", num(n), ", got ", num((x).size(i)))
#define LLM2COMP_CHECK_SAME_DEVICE(x, ref) \
    TORCH_CHECK((x).device() == (ref).device(), OP, ": ", #x " is on ", (x).device(), " but " #ref " is on ", (ref).device())
#define LLM2COMP_CHECK_LAUNCH(err) TORCH_CHECK((err) == cudaSuccess, OP, ": kernel launch failed: ", cudaGetErrorString(err))

// Numbers and shapes enter the error messages as std::string: streaming integers through TORCH_CHECK's
// message builder segfaulted in an extension built against torch 2.11 (the GPU run's setup), while
// strings, devices and dtypes were fine.
std::string num(int64_t v) { return std::to_string(v); }
std::string real(double v) { return std::to_string(v); }
std::string shape(c10::IntArrayRef s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
}

DType float_dtype(const char* op, const char* name, const at::Tensor& x) {
    switch (x.scalar_type()) {
        case at::kFloat: return DType::kFloat32;
        case at::kHalf: return DType::kFloat16;
        case at::kBFloat16: return DType::kBFloat16;
        default: TORCH_CHECK(false, op, ": ", name, " must be float32/float16/bfloat16, got ", x.scalar_type());
    }
}

// An int64 [n] vector on x's device (the Python wrappers convert int32 inputs).
void check_index(const char* OP, const char* name, const at::Tensor& idx, const at::Tensor& ref, int64_t n) {
    TORCH_CHECK(idx.is_cuda(), OP, ": ", name, " must be a CUDA tensor, got ", idx.device());
    TORCH_CHECK(idx.device() == ref.device(), OP, ": ", name, " is on ", idx.device(), " but the data is on ", ref.device());
    TORCH_CHECK(idx.scalar_type() == at::kLong, OP, ": ", name, " must be int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == n && idx.is_contiguous(), OP, ": ", name,
                " must be a contiguous [", num(n), "] vector, got shape ", shape(idx.sizes()));
}

// ---- span_mean_pool --------------------------------------------------------------------------------

at::Tensor span_mean_pool_fwd_op(const at::Tensor& hidden, const at::Tensor& start, const at::Tensor& length) {
    constexpr const char* OP = "llm2comp::span_mean_pool_fwd";
    LLM2COMP_CHECK_CUDA(hidden);
    LLM2COMP_CHECK_DIM(hidden, 3);
    LLM2COMP_CHECK_CONTIGUOUS(hidden);
    const DType dtype = float_dtype(OP, "hidden", hidden);
    const int64_t B = hidden.size(0), L = hidden.size(1), D = hidden.size(2);
    check_index(OP, "start", start, hidden, B);
    check_index(OP, "length", length, hidden, B);
    const c10::cuda::CUDAGuard guard(hidden.device());
    at::Tensor out = at::empty({B, D}, hidden.options());
    if (B == 0 || D == 0) return out;
    const cudaError_t err = span_mean_pool_fwd(dtype, hidden.data_ptr(), start.data_ptr<int64_t>(),
                                               length.data_ptr<int64_t>(), out.data_ptr(), B, L, D,
                                               at::cuda::getCurrentCUDAStream());
    LLM2COMP_CHECK_LAUNCH(err);
    return out;
}

at::Tensor span_mean_pool_bwd_op(const at::Tensor& grad_out, const at::Tensor& start, const at::Tensor& length,
                                 int64_t L) {
    constexpr const char* OP = "llm2comp::span_mean_pool_bwd";
    LLM2COMP_CHECK_CUDA(grad_out);
    LLM2COMP_CHECK_DIM(grad_out, 2);
    LLM2COMP_CHECK_CONTIGUOUS(grad_out);
    TORCH_CHECK(L >= 1, OP, ": L must be >= 1, got ", num(L));
    const DType dtype = float_dtype(OP, "grad_out", grad_out);
    const int64_t B = grad_out.size(0), D = grad_out.size(1);
    check_index(OP, "start", start, grad_out, B);
    check_index(OP, "length", length, grad_out, B);
    const c10::cuda::CUDAGuard guard(grad_out.device());
    at::Tensor grad_hidden = at::empty({B, L, D}, grad_out.options());  // the kernel writes every element
    if (B == 0 || D == 0) return grad_hidden;
    const cudaError_t err = span_mean_pool_bwd(dtype, grad_out.data_ptr(), start.data_ptr<int64_t>(),
                                               length.data_ptr<int64_t>(), grad_hidden.data_ptr(), B, L, D,
                                               at::cuda::getCurrentCUDAStream());
    LLM2COMP_CHECK_LAUNCH(err);
    return grad_hidden;
}

// ---- contrastive_loss ------------------------------------------------------------------------------

void check_pair(const char* OP, const at::Tensor& queries, const at::Tensor& docs) {
    LLM2COMP_CHECK_CUDA(queries);
    LLM2COMP_CHECK_CUDA(docs);
    LLM2COMP_CHECK_SAME_DEVICE(docs, queries);
    LLM2COMP_CHECK_DIM(queries, 2);
    LLM2COMP_CHECK_DIM(docs, 2);
    LLM2COMP_CHECK_CONTIGUOUS(queries);
    LLM2COMP_CHECK_CONTIGUOUS(docs);
    LLM2COMP_CHECK_DTYPE(docs, queries.scalar_type());
    LLM2COMP_CHECK_SIZE(docs, 1, queries.size(1));
    TORCH_CHECK(queries.size(0) >= 1 && docs.size(0) >= 1 && queries.size(1) >= 1, OP,
                ": queries and docs must be non-empty, got ", shape(queries.sizes()), " and ", shape(docs.sizes()));
}

// fp32 a @ b on cuBLAS: 16-bit operands with an fp32 output (exact products, fp32 sums), float32 ones as
// torch multiplies them (IEEE unless the user allowed TF32).
at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) {
    return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}

// Whether at::addmm takes an fp32 tensor to add to 16-bit operands' fp32 product (out_dtype kFloat). The first
// releases with out_dtype (torch 2.8, 2.9) required it in the operands' dtype; later ones accept the output's.
// Probed once, on a 1 x 1 product on `like`'s device, rather than guessed from the version.
bool addmm_takes_fp32_accumulator(const at::Tensor& like) {
    static const bool takes = [&] {
        const at::Tensor x = at::zeros({1, 1}, like.options());
        try {
            at::addmm(at::zeros({1, 1}, like.options().dtype(at::kFloat)), x, x, at::kFloat);
        } catch (const c10::Error&) {
            return false;
        }
        return true;
    }();
    return takes;
}

// Docs per chunk: `requested` if > 0 (the tests' way to cover many chunks), else the kernels' budget for a
// block of fp32 logits plus (16-bit inputs) its dS block.
int64_t doc_chunk(const char* OP, int64_t requested, int64_t B, int64_t N, const at::Tensor& queries) {
    TORCH_CHECK(requested >= 0, OP, ": doc_chunk must be >= 0 (0: automatic), got ", num(requested));
    if (requested > 0) return std::min(requested, N);
    const int64_t itemsize = queries.element_size();
    return contrastive_loss_doc_chunk(B, N, itemsize == 4 ? 4 : 4 + itemsize);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_fwd_op(const at::Tensor& queries,
                                                                       const at::Tensor& docs,
                                                                       const at::Tensor& labels, double temperature,
                                                                       bool symmetric, int64_t requested_chunk) {
    // labels must lie in [0, N): the Python API checks it once per tensor; checking here would sync every call
    // (the kernels never index with a bad label; its loss is NaN).
    constexpr const char* OP = "llm2comp::contrastive_loss_fwd";
    check_pair(OP, queries, docs);
    float_dtype(OP, "queries", queries);
    const int64_t B = queries.size(0), N = docs.size(0);
    check_index(OP, "labels", labels, queries, B);
    TORCH_CHECK(temperature > 0, OP, ": temperature must be > 0, got ", real(temperature));
    const int64_t chunk = doc_chunk(OP, requested_chunk, B, N, queries);
    const c10::cuda::CUDAGuard guard(queries.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const float scale_log2 = static_cast<float>(kLog2e / temperature);
    const auto f32 = queries.options().dtype(at::kFloat);
    // loss holds each query's positive logit until finalize; (max, sum) per row / column, log2 units.
    at::Tensor loss = at::empty({B}, f32), row_stats = at::empty({B, 2}, f32);
    at::Tensor col_stats = at::empty({symmetric ? N : 0, 2}, f32);
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
        const at::Tensor docs_chunk = docs.narrow(0, n0, std::min(chunk, N - n0));
        const at::Tensor logits = mm_fp32(queries, docs_chunk.t());  // [B, width]
        LLM2COMP_CHECK_LAUNCH(contrastive_loss_block_stats(
            logits.data_ptr<float>(), B, logits.size(1), n0, scale_log2, n0 == 0, row_stats.data_ptr<float>(),
            labels.data_ptr<int64_t>(), loss.data_ptr<float>(), stream));
        if (symmetric) {  // the block holds these docs against every query: their column statistics, complete
            LLM2COMP_CHECK_LAUNCH(contrastive_loss_col_stats(logits.data_ptr<float>(), B, logits.size(1), scale_log2,
                                                             col_stats.data_ptr<float>() + 2 * n0, stream));
        }
    }
    LLM2COMP_CHECK_LAUNCH(contrastive_loss_finalize(row_stats.data_ptr<float>(),
                                                    symmetric ? col_stats.data_ptr<float>() : nullptr,
                                                    labels.data_ptr<int64_t>(), loss.data_ptr<float>(), B, N, stream));
    return {loss, row_stats, col_stats};
}

std::tuple<at::Tensor, at::Tensor> contrastive_loss_bwd_op(const at::Tensor& grad_loss, const at::Tensor& queries,
                                                           const at::Tensor& docs, const at::Tensor& labels,
                                                           const at::Tensor& row_stats, const at::Tensor& col_stats,
                                                           double temperature, bool symmetric,
                                                           int64_t requested_chunk) {
    constexpr const char* OP = "llm2comp::contrastive_loss_bwd";
    check_pair(OP, queries, docs);
    const DType dtype = float_dtype(OP, "queries", queries);
    const int64_t B = queries.size(0), N = docs.size(0), D = queries.size(1);
    check_index(OP, "labels", labels, queries, B);
    for (const auto& [name, x, n, w] : {std::make_tuple("grad_loss", &grad_loss, B, int64_t(0)),
                                        std::make_tuple("row_stats", &row_stats, B, int64_t(2)),
                                        std::make_tuple("col_stats", &col_stats, symmetric ? N : int64_t(0), int64_t(2))}) {
        TORCH_CHECK(x->is_cuda() && x->device() == queries.device(), OP, ": ", name,
                    " must be on the queries' CUDA device, got ", x->device());
        TORCH_CHECK(x->scalar_type() == at::kFloat, OP, ": ", name, " must be float32, got ", x->scalar_type());
        const bool ok = w == 0 ? (x->dim() == 1 && x->size(0) == n) : (x->dim() == 2 && x->size(0) == n && x->size(1) == w);
        TORCH_CHECK(ok && x->is_contiguous(), OP, ": ", name, " must be a contiguous [", num(n), w ? ", 2" : "",
                    "] tensor, got shape ", shape(x->sizes()));
    }
    TORCH_CHECK(temperature > 0, OP, ": temperature must be > 0, got ", real(temperature));
    const int64_t chunk = doc_chunk(OP, requested_chunk, B, N, queries);
    const c10::cuda::CUDAGuard guard(queries.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const float scale_log2 = static_cast<float>(kLog2e / temperature);
    const double inv_temp = 1.0 / temperature;
    const auto f32 = queries.options().dtype(at::kFloat);
    // Softmax weights: the row term carries g (halved when symmetric), the column term of doc j half the g of
    // every query whose positive is j. index_put_ sums repeated labels in a fixed order (on CUDA it sorts the
    // indices), so the gradients are bitwise reproducible, which atomics would not make them (a label past N
    // stops it with a device-side assert; the Python API rejects such labels first).
    const at::Tensor w_row = symmetric ? grad_loss * 0.5 : grad_loss;
    at::Tensor w_col = at::zeros({symmetric ? N : 0}, f32);
    if (symmetric) w_col.index_put_({labels}, w_row, /*accumulate=*/true);
    float* w_col_ptr = symmetric ? w_col.data_ptr<float>() : nullptr;
    const float* col_stats_ptr = symmetric ? col_stats.data_ptr<float>() : nullptr;
    // fp32 gradients whatever the input dtype: the caller may still chain them through a normalisation,
    // where rounding them to bf16 first would cost accuracy.
    at::Tensor dq = at::zeros({B, D}, f32), dd = at::empty({N, D}, f32);
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
        const at::Tensor docs_chunk = docs.narrow(0, n0, std::min(chunk, N - n0));
        const at::Tensor logits = mm_fp32(queries, docs_chunk.t());  // [B, width], recomputed as in the forward
        const int64_t width = logits.size(1);
        // float32 inputs: dS overwrites the logits (each element read, then written, by one thread).
        const at::Tensor ds = dtype == DType::kFloat32 ? logits : at::empty({B, width}, queries.options());
        LLM2COMP_CHECK_LAUNCH(contrastive_loss_block_dlogits(
            dtype, logits.data_ptr<float>(), ds.data_ptr(), B, width, n0, scale_log2, row_stats.data_ptr<float>(),
            w_row.data_ptr<float>(), col_stats_ptr, w_col_ptr, labels.data_ptr<int64_t>(),
            grad_loss.data_ptr<float>(), stream));
        // 1/T on the fp32 products: dS itself stays within |g|, in range for fp16 under loss scaling.
        if (dtype == DType::kFloat32) {
            dq.addmm_(ds, docs_chunk, 1.0, inv_temp);
        } else if (addmm_takes_fp32_accumulator(queries)) {
            dq = at::addmm(dq, ds, docs_chunk, at::kFloat, 1.0, inv_temp);
        } else {
            dq.add_(at::mm(ds, docs_chunk, at::kFloat), inv_temp);
        }
        at::Tensor dd_chunk = dd.narrow(0, n0, width);
        at::mul_out(dd_chunk, mm_fp32(ds.t(), queries), inv_temp);
    }
    return {dq, dd};
}

// ---- memory_attention ------------------------------------------------------------------------------

AttentionStrides attention_strides(const char* OP, const char* name, const at::Tensor& x) {
    TORCH_CHECK(x.stride(3) == 1, OP, ": ", name, " must have unit stride along the head dim, got strides ",
                shape(x.strides()));
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.stride(0) % 8 == 0 &&
                    x.stride(1) % 8 == 0 && x.stride(2) % 8 == 0,
                OP, ": ", name, " must be 16-byte aligned with strides that are multiples of 8 elements, got strides ",
                shape(x.strides()));
    return {x.stride(0), x.stride(1), x.stride(2)};
}

std::tuple<at::Tensor, at::Tensor> memory_attention_fwd_op(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& seq_lens,
                                                           bool causal, double scale, bool with_lse,
                                                           int64_t block_warps) {
    constexpr const char* OP = "llm2comp::memory_attention_fwd";
    LLM2COMP_CHECK_CUDA(q);
    LLM2COMP_CHECK_CUDA(k);
    LLM2COMP_CHECK_CUDA(v);
    LLM2COMP_CHECK_SAME_DEVICE(k, q);
    LLM2COMP_CHECK_SAME_DEVICE(v, q);
    LLM2COMP_CHECK_DIM(q, 4);
    LLM2COMP_CHECK_DIM(k, 4);
    LLM2COMP_CHECK_DIM(v, 4);
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, OP,
                ": q must be float16/bfloat16, got ", q.scalar_type());
    LLM2COMP_CHECK_DTYPE(k, q.scalar_type());
    LLM2COMP_CHECK_DTYPE(v, q.scalar_type());
    const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), d = q.size(3), Hkv = k.size(1);
    TORCH_CHECK(d == 64 || d == 128, OP, ": head dim must be 64 or 128, got ", num(d));
    TORCH_CHECK(k.sizes() == v.sizes(), OP, ": k and v must have the same shape, got ", shape(k.sizes()), " and ",
                shape(v.sizes()));
    LLM2COMP_CHECK_SIZE(k, 0, B);
    LLM2COMP_CHECK_SIZE(k, 2, L);
    LLM2COMP_CHECK_SIZE(k, 3, d);
    TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, OP, ": q heads (", num(Hq), ") must be a multiple of kv heads (", num(Hkv),
                ")");
    TORCH_CHECK(L >= 1 && L <= INT32_MAX, OP, ": sequence length must be in [1, 2^31), got ", num(L));
    check_index(OP, "seq_lens", seq_lens, q, B);
    TORCH_CHECK(scale > 0, OP, ": scale must be > 0, got ", real(scale));
    TORCH_CHECK(block_warps == 4 || block_warps == 8, OP, ": block_warps must be 4 or 8, got ", num(block_warps));
    const AttentionStrides sq = attention_strides(OP, "q", q), sk = attention_strides(OP, "k", k),
                           sv = attention_strides(OP, "v", v);
    const c10::cuda::CUDAGuard guard(q.device());
    const size_t smem = memory_attention_smem_bytes(d, static_cast<int>(block_warps));
    const size_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem <= smem_limit, OP, ": block_warps=", num(block_warps), " with head dim ", num(d), " needs ",
                num(smem), " bytes of shared memory per block, this GPU allows ", num(smem_limit),
                "; use block_warps=4");
    at::Tensor out = at::empty({B, Hq, L, d}, q.options());
    const auto f32 = q.options().dtype(at::kFloat);
    at::Tensor lse = with_lse ? at::empty({B, Hq, L}, f32) : at::empty({0}, f32);
    if (B == 0 || Hq == 0) return {out, lse};
    const DType dtype = q.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
    const cudaError_t err = memory_attention_fwd(
        dtype, q.data_ptr(), k.data_ptr(), v.data_ptr(), seq_lens.data_ptr<int64_t>(), out.data_ptr(),
        with_lse ? lse.data_ptr<float>() : nullptr, B, Hq, Hkv, L, d, sq, sk, sv, causal, static_cast<float>(scale),
        static_cast<int>(block_warps), at::cuda::getCurrentCUDAStream());
    LLM2COMP_CHECK_LAUNCH(err);
    return {out, lse};
}

}  // namespace
}  // namespace llm2comp

TORCH_LIBRARY(llm2comp, m) {
    m.def("span_mean_pool_fwd(Tensor hidden, Tensor start, Tensor length) -> Tensor");
    m.def("span_mean_pool_bwd(Tensor grad_out, Tensor start, Tensor length, int L) -> Tensor");
    m.def("contrastive_loss_fwd(Tensor queries, Tensor docs, Tensor labels, float temperature, bool symmetric,"
          " int doc_chunk=0) -> (Tensor, Tensor, Tensor)");
    m.def("contrastive_loss_bwd(Tensor grad_loss, Tensor queries, Tensor docs, Tensor labels, Tensor row_stats,"
          " Tensor col_stats, float temperature, bool symmetric, int doc_chunk=0) -> (Tensor, Tensor)");
    m.def("memory_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor seq_lens, bool causal, float scale,"
          " bool with_lse=False, int block_warps=4) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llm2comp, CUDA, m) {
    m.impl("span_mean_pool_fwd", &llm2comp::span_mean_pool_fwd_op);
    m.impl("span_mean_pool_bwd", &llm2comp::span_mean_pool_bwd_op);
    m.impl("contrastive_loss_fwd", &llm2comp::contrastive_loss_fwd_op);
    m.impl("contrastive_loss_bwd", &llm2comp::contrastive_loss_bwd_op);
    m.impl("memory_attention_fwd", &llm2comp::memory_attention_fwd_op);
}

// The same entry points under CPU, so that CPU tensors get the checks' "must be a CUDA tensor" error
// instead of the dispatcher's generic "no CPU kernel".
TORCH_LIBRARY_IMPL(llm2comp, CPU, m) {
    m.impl("span_mean_pool_fwd", &llm2comp::span_mean_pool_fwd_op);
    m.impl("span_mean_pool_bwd", &llm2comp::span_mean_pool_bwd_op);
    m.impl("contrastive_loss_fwd", &llm2comp::contrastive_loss_fwd_op);
    m.impl("contrastive_loss_bwd", &llm2comp::contrastive_loss_bwd_op);
    m.impl("memory_attention_fwd", &llm2comp::memory_attention_fwd_op);
}

// An importable module: `import llm2comp_kernels._C` loads the library and runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
