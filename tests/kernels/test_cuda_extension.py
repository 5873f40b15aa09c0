"""The CUDA C++ extension `llm2comp_kernels._C`: the cuda backend against the float64 reference and the
Triton backend, its autograd, the binding's own argument errors, and the clear error without it."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from llm2comp_kernels import contrastive_loss, memory_attention, span_mean_pool
from llm2comp_kernels._backends import cuda_extension
from llm2comp_kernels.contrastive_loss.reference import contrastive_loss_reference
from llm2comp_kernels.memory_attention.reference import memory_attention_lse_reference, memory_attention_reference
from llm2comp_kernels.span_mean_pool.reference import span_mean_pool_reference
from llm2comp_kernels.testing import (
    REL_TOL,
    make_attention_inputs,
    make_contrastive_inputs,
    make_pool_inputs,
    rel_err,
    seq_lens_mixed,
)
from tests.utils import assert_rel_close

HAS_EXT = cuda_extension() is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="the CUDA extension llm2comp_kernels._C is not built")


def _has_triton_backend(op: str) -> bool:
    return importlib.util.find_spec(f"llm2comp_kernels.{op}.triton") is not None


def _poison_cache() -> None:
    """Leave NaN-filled blocks in the caching allocator, so that an output element the kernels forget to
    write (outputs come from at::empty) most likely reads back as NaN and fails assert_rel_close."""
    torch.cuda.empty_cache()
    for n in (1 << 16, 1 << 18, 1 << 22, 1 << 25):  # small-pool and large-pool segments
        torch.full((n,), float("nan"), device="cuda")


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


# ---- without the extension ---------------------------------------------------------------------------

def test_cuda_backend_error_is_clear():
    """backend="cuda" raises a RuntimeError that says why: the extension is missing, or (built) the
    tensors are on the CPU."""
    match = "CUDA tensors" if HAS_EXT else "was not built"
    hidden, start, length = make_pool_inputs(2, 4, 8)
    with pytest.raises(RuntimeError, match=match):
        span_mean_pool(hidden, start, length, backend="cuda")
    q, d = make_contrastive_inputs(3, 3, 8)
    with pytest.raises(RuntimeError, match=match):
        contrastive_loss(q, d, backend="cuda")
    q, k, v, seq_lens = make_attention_inputs(1, 2, 2, 4, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=match):
        memory_attention(q, k, v, seq_lens, backend="cuda")


@needs_ext
def test_ops_registered_and_cpu_tensors_rejected_by_the_binding():
    for name in ("span_mean_pool_fwd", "span_mean_pool_bwd", "contrastive_loss_fwd", "contrastive_loss_bwd",
                 "memory_attention_fwd"):
        assert hasattr(torch.ops.llm2comp, name), name
    hidden = torch.randn(2, 4, 8)
    start = torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="span_mean_pool_fwd: hidden must be a CUDA tensor"):
        torch.ops.llm2comp.span_mean_pool_fwd(hidden, start, start + 1)


# ---- span_mean_pool ----------------------------------------------------------------------------------

POOL_SHAPES = [(1, 1, 1), (3, 7, 5), (5, 33, 130), (2, 9, 136), (4, 20, 4096)]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("B,L,D", POOL_SHAPES)
def test_span_mean_pool_cuda(B, L, D, dtype):
    hidden, start, length = make_pool_inputs(B, L, D, dtype=dtype, device="cuda", seed=B + L + D)
    grad = torch.randn(B, D, device="cuda").to(dtype)
    _poison_cache()
    out = span_mean_pool(hidden, start, length, backend="cuda")
    (grad_hidden,) = torch.autograd.grad(out, hidden, grad)

    h64 = _leaf(hidden.double())
    ref = span_mean_pool_reference(h64, start, length)
    (ref_grad,) = torch.autograd.grad(ref, h64, grad.double())
    assert out.dtype == dtype
    assert_rel_close(out, ref, name="out")
    assert_rel_close(grad_hidden, ref_grad, name="grad_hidden")
    outside = torch.ones(B, L, dtype=torch.bool, device="cuda")
    for b in range(B):
        outside[b, int(start[b]): int(start[b] + length[b])] = False
    assert (grad_hidden[outside] == 0).all(), "gradient outside the span must be exactly zero"
    if _has_triton_backend("span_mean_pool"):
        assert_rel_close(out, span_mean_pool(hidden, start, length, backend="triton"), name="out vs triton")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_span_mean_pool_cuda_unaligned_pointer(dtype):
    """A contiguous view starting one element into its storage cannot use 16-byte loads."""
    B, L, D = 3, 6, 64
    hidden = torch.randn(B * L * D + 1, device="cuda").to(dtype)[1:].view(B, L, D)
    assert hidden.data_ptr() % 16 != 0
    start = torch.tensor([0, 2, 5], device="cuda")
    length = torch.tensor([6, 3, 1], device="cuda")
    out = span_mean_pool(hidden, start, length, backend="cuda")
    assert_rel_close(out, span_mean_pool_reference(hidden.double(), start, length))


# ---- contrastive_loss --------------------------------------------------------------------------------

CONTRASTIVE_SHAPES = [(1, 1, 1), (5, 5, 7), (13, 29, 70), (70, 70, 33), (64, 130, 256)]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("labels_kind", ["diagonal", "random"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,N,D", CONTRASTIVE_SHAPES)
def test_contrastive_loss_cuda(B, N, D, dtype, symmetric, labels_kind):
    q, d = make_contrastive_inputs(B, N, D, dtype=dtype, device="cuda", seed=B * N + D)
    g = torch.Generator().manual_seed(D)
    labels = None if labels_kind == "diagonal" else torch.randint(0, N, (B,), generator=g).cuda()  # may repeat
    kwargs = dict(labels=labels, temperature=0.05, normalize=True, symmetric=symmetric)
    _poison_cache()
    loss = contrastive_loss(q, d, backend="cuda", **kwargs)
    dq, dd = torch.autograd.grad(loss * 1.7, (q, d))

    q64, d64 = _leaf(q.double()), _leaf(d.double())
    ref_labels = torch.arange(B, device="cuda") if labels is None else labels
    ref = contrastive_loss_reference(q64, d64, ref_labels, 0.05, True, symmetric, "mean")
    ref_dq, ref_dd = torch.autograd.grad(ref * 1.7, (q64, d64))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_rel_close(loss, ref, tol=REL_TOL[dtype], name="loss")  # fp32 loss of rounded inputs
    # The unit vectors enter the tensor cores rounded to `dtype`; the gradient's projection onto the tangent
    # of the sphere cancels most of it, so allow twice the error of plain torch doing the same rounding.
    same_dq, same_dd = _same_dtype_torch_grads(q, d, ref_labels, 0.05, symmetric, 1.7)
    for name, got, same, want in (("dq", dq, same_dq, ref_dq), ("dd", dd, same_dd, ref_dd)):
        assert_rel_close(got, want, tol=max(REL_TOL[dtype], 2 * rel_err(same, want)), name=name)
    if _has_triton_backend("contrastive_loss"):
        assert_rel_close(loss, contrastive_loss(q, d, backend="triton", **kwargs), tol=REL_TOL[dtype],
                         name="loss vs triton")


def _same_dtype_torch_grads(q, d, labels, temperature, symmetric, scale):
    """Gradients of the normalised InfoNCE with the unit vectors rounded to the inputs' dtype (the rounding
    the kernels also see), everything else in fp32, returned in the inputs' dtype (tiny fp16 gradients are
    subnormal there): the error budget for low-precision inputs."""
    q32, d32 = _leaf(q.float()), _leaf(d.float())
    qn = F.normalize(q32, dim=-1).to(q.dtype).float()
    dn = F.normalize(d32, dim=-1).to(d.dtype).float()
    logits = qn @ dn.T / temperature
    loss = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits[:, labels].T, torch.arange(len(labels), device=q.device),
                                             reduction="none"))
    return tuple(g.to(q.dtype) for g in torch.autograd.grad(loss.mean() * scale, (q32, d32)))


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_contrastive_loss_cuda_unnormalized_reductions(reduction, dtype):
    B, N, D = 37, 50, 96
    q, d = make_contrastive_inputs(B, N, D, dtype=dtype, device="cuda", seed=3)
    q, d = _leaf(q * 0.2), _leaf(d * 0.2)  # dot products of a few units
    labels = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(1)).cuda()
    loss = contrastive_loss(q, d, labels=labels, temperature=0.5, normalize=False, symmetric=True,
                            reduction=reduction, backend="cuda")
    grad = torch.randn(loss.shape, device="cuda").to(dtype)
    dq, dd = torch.autograd.grad(loss, (q, d), grad)

    q64, d64 = _leaf(q.double()), _leaf(d.double())
    ref = contrastive_loss_reference(q64, d64, labels, 0.5, False, True, reduction)
    ref_dq, ref_dd = torch.autograd.grad(ref, (q64, d64), grad.double())
    assert_rel_close(loss, ref, tol=REL_TOL[dtype], name="loss")  # fp32 loss of rounded inputs
    assert_rel_close(dq, ref_dq, name="dq")
    assert_rel_close(dd, ref_dd, name="dd")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("doc_chunk", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_contrastive_loss_cuda_doc_chunks(doc_chunk, dtype):
    """Docs in chunks (N = 130 in chunks of 1, 7 and 64, the last one partial): the online merge of the row
    statistics, the positive found in whichever chunk holds it, the column statistics and the accumulated dq
    give the float64 reference's loss and gradients, symmetric with repeated labels."""
    from llm2comp_kernels.contrastive_loss.cuda import contrastive_loss_cuda

    B, N, D = 37, 130, 96
    q, d = make_contrastive_inputs(B, N, D, dtype=dtype, device="cuda", seed=5)
    labels = torch.randint(0, N, (B,), generator=torch.Generator().manual_seed(2)).cuda()
    _poison_cache()
    loss = contrastive_loss_cuda(q, d, labels, 0.1, True, True, "mean", doc_chunk=doc_chunk)
    dq, dd = torch.autograd.grad(loss * 1.7, (q, d))
    q64, d64 = _leaf(q.double()), _leaf(d.double())
    ref = contrastive_loss_reference(q64, d64, labels, 0.1, True, True, "mean")
    ref_dq, ref_dd = torch.autograd.grad(ref * 1.7, (q64, d64))
    same_dq, same_dd = _same_dtype_torch_grads(q, d, labels, 0.1, True, 1.7)
    assert_rel_close(loss, ref, tol=REL_TOL[dtype], name="loss")  # fp32 loss of rounded inputs
    for name, got, same, want in (("dq", dq, same_dq, ref_dq), ("dd", dd, same_dd, ref_dd)):
        assert_rel_close(got, want, tol=max(REL_TOL[dtype], 2 * rel_err(same, want)), name=name)


@pytest.mark.gpu
@needs_ext
def test_contrastive_loss_cuda_backward_is_deterministic():
    """Symmetric with every query on one of three docs: the column weights sum many queries each, in a fixed
    order (no atomics), so repeated backwards agree bit for bit."""
    from llm2comp_kernels.contrastive_loss.cuda import contrastive_loss_cuda

    q, d = make_contrastive_inputs(4096, 3, 64, dtype=torch.bfloat16, device="cuda", seed=7)
    labels = torch.randint(0, 3, (4096,), generator=torch.Generator().manual_seed(7)).cuda()
    runs = [torch.autograd.grad(contrastive_loss_cuda(q, d, labels, 0.05, True, True, "mean"), (q, d))
            for _ in range(5)]
    for dq, dd in runs[1:]:
        assert torch.equal(dq, runs[0][0]) and torch.equal(dd, runs[0][1])


@pytest.mark.gpu
@needs_ext
def test_direct_op_calls_with_bad_indices_give_nan():
    """torch.ops.llm2comp.* skip the Python API's index checks (they would sync): a bad span or label gives a
    NaN row or loss instead of an out-of-bounds access; the other rows are right."""
    ops = torch.ops.llm2comp
    hidden, start, length = make_pool_inputs(3, 6, 40, device="cuda", requires_grad=False)
    start[0], length[0] = 4, 4  # past L
    out = ops.span_mean_pool_fwd(hidden, start.long(), length.long())
    grad_hidden = ops.span_mean_pool_bwd(torch.ones(3, 40, device="cuda"), start.long(), length.long(), 6)
    assert out[0].isnan().all() and grad_hidden[0].isnan().all()
    assert_rel_close(out[1:], span_mean_pool_reference(hidden[1:].double(), start[1:], length[1:]))
    q, d = make_contrastive_inputs(3, 4, 16, device="cuda", requires_grad=False)
    loss, _, _ = ops.contrastive_loss_fwd(q, d, torch.tensor([0, 4, 2], device="cuda"), 0.1, False)
    ref = contrastive_loss_reference(q.double(), d.double(), torch.tensor([0, 0, 2], device="cuda"), 0.1,
                                     normalize=False, symmetric=False, reduction="none")
    assert loss[1].isnan() and torch.isfinite(loss[[0, 2]]).all()
    assert_rel_close(loss[[0, 2]], ref[[0, 2]])


# ---- memory_attention --------------------------------------------------------------------------------

ATTN_CASES = list(itertools.product([1, 17, 64, 130], [(4, 4), (6, 2), (8, 1)], [64, 128], [False, True],
                                    [torch.bfloat16, torch.float16]))


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("L,heads,d,causal,dtype", ATTN_CASES,
                         ids=[f"L{c[0]}-h{c[1][0]}x{c[1][1]}-d{c[2]}-{'causal' if c[3] else 'bidir'}-{c[4]}"
                              for c in ATTN_CASES])
def test_memory_attention_cuda_forward(L, heads, d, causal, dtype):
    Hq, Hkv = heads
    q, k, v, seq_lens = make_attention_inputs(3, Hq, Hkv, L, d, dtype=dtype, device="cuda", seed=L + d,
                                              requires_grad=False)
    _poison_cache()
    out = memory_attention(q, k, v, seq_lens, causal=causal, backend="cuda")
    ref = memory_attention_reference(q.double(), k.double(), v.double(), seq_lens, causal, d ** -0.5)
    assert out.dtype == dtype
    assert_rel_close(out, ref)
    for b in range(3):
        assert (out[b, :, int(seq_lens[b]):] == 0).all(), "padded query rows must be exact zeros"
    if _has_triton_backend("memory_attention"):
        tri = memory_attention(q, k, v, seq_lens, causal=causal, backend="triton")
        assert_rel_close(out, tri, tol=REL_TOL[dtype], name="cuda vs triton")


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("block_warps", [4, 8])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_memory_attention_cuda_block_edges(d, causal, block_warps):
    """Lengths on either side of the 64-key block edges (63, 64, 65, 129) and one of five blocks (300): the
    double-buffered key loop (a prefetch per block but the last) and the zero-filled rows past each length;
    64- and 128-query blocks (`block_warps`), the latter also directly through the op with its log-sum-exps."""
    seq_lens = torch.tensor([300, 63, 64, 65, 129], device="cuda")
    q, k, v, seq_lens = make_attention_inputs(5, 4, 2, 300, d, dtype=torch.bfloat16, device="cuda", seed=d,
                                              seq_lens=seq_lens, requires_grad=False)
    from llm2comp_kernels.memory_attention.cuda import memory_attention_cuda

    _poison_cache()
    out = memory_attention_cuda(q, k, v, seq_lens, causal, d ** -0.5, block_warps)
    ref = memory_attention_reference(q.double(), k.double(), v.double(), seq_lens, causal, d ** -0.5)
    assert_rel_close(out, ref)
    for b in range(5):
        assert (out[b, :, int(seq_lens[b]):] == 0).all(), "padded query rows must be exact zeros"
    out_op, lse = torch.ops.llm2comp.memory_attention_fwd(q, k, v, seq_lens, causal, d ** -0.5, True, block_warps)
    assert torch.equal(out_op, out)
    ref_lse = memory_attention_lse_reference(q.double(), k.double(), seq_lens, causal, d ** -0.5)
    assert (lse - ref_lse).abs().max() < 1e-3, "log-sum-exps (log2) of the forward"


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("layout", ["transposed_bld", "head_dim_strided"])
def test_memory_attention_cuda_strided_inputs(layout):
    """Transposes of [B, L, H, d] go in without a copy; a non-unit head-dim stride is copied first."""
    B, Hq, Hkv, L, d = 2, 4, 2, 70, 64
    g = torch.Generator().manual_seed(0)

    def make(h):
        if layout == "transposed_bld":
            return torch.randn(B, L, h, d, generator=g).cuda().bfloat16().transpose(1, 2)
        return torch.randn(B, h, d, L, generator=g).cuda().bfloat16().transpose(2, 3)

    q, k, v = make(Hq), make(Hkv), make(Hkv)
    seq_lens = torch.tensor([70, 33], device="cuda")
    out = memory_attention(q, k, v, seq_lens, scale=0.1, backend="cuda")
    ref = memory_attention_reference(q.double(), k.double(), v.double(), seq_lens, False, 0.1)
    assert_rel_close(out, ref)


@pytest.mark.gpu
@needs_ext
@pytest.mark.skipif(not _has_triton_backend("memory_attention"), reason="the backward runs the Triton kernel")
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_memory_attention_cuda_backward(d, causal):
    B, Hq, Hkv, L = 3, 6, 2, 130
    q, k, v, seq_lens = make_attention_inputs(B, Hq, Hkv, L, d, dtype=torch.bfloat16, device="cuda", seed=d)
    out = memory_attention(q, k, v, seq_lens, causal=causal, backend="cuda")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [_leaf(x.double()) for x in (q, k, v)]
    ref = memory_attention_reference(*leaves, seq_lens, causal, d ** -0.5)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_rel_close(got, want, name=f"d{name}")


# ---- the binding's own argument checks ---------------------------------------------------------------

def _bad_input_cases():
    cuda = dict(device="cuda")
    h = torch.randn(2, 5, 8, **cuda)
    s = torch.zeros(2, dtype=torch.long, **cuda)
    n = torch.ones(2, dtype=torch.long, **cuda)
    q = torch.randn(3, 16, **cuda)
    d = torch.randn(4, 16, **cuda)
    lab = torch.zeros(3, dtype=torch.long, **cuda)
    a = torch.randn(1, 2, 8, 64, **cuda).half()
    lens = torch.full((1,), 8, dtype=torch.long, **cuda)
    ops = torch.ops.llm2comp
    return [
        ("pool int hidden", lambda: ops.span_mean_pool_fwd(h.int(), s, n), "must be float32/float16/bfloat16"),
        ("pool non-contiguous", lambda: ops.span_mean_pool_fwd(h.transpose(0, 1), s, n), "must be contiguous"),
        ("pool int32 start", lambda: ops.span_mean_pool_fwd(h, s.int(), n), "start must be int64"),
        ("pool cpu length", lambda: ops.span_mean_pool_fwd(h, s, n.cpu()), "length must be a CUDA tensor"),
        ("pool bwd L", lambda: ops.span_mean_pool_bwd(h[:, 0].contiguous(), s, n, 0), "L must be >= 1"),
        ("cl dtype mismatch", lambda: ops.contrastive_loss_fwd(q, d.half(), lab, 0.05, False), "docs must be"),
        ("cl D mismatch", lambda: ops.contrastive_loss_fwd(q, d[:, :8].contiguous(), lab, 0.05, False),
         r"docs.size\(1\) must be 16"),
        ("cl labels length", lambda: ops.contrastive_loss_fwd(q, d, lab[:2], 0.05, False), r"contiguous \[3\]"),
        ("cl cpu queries", lambda: ops.contrastive_loss_fwd(q.cpu(), d, lab, 0.05, False),
         "queries must be a CUDA tensor"),
        ("cl bwd row_stats", lambda: ops.contrastive_loss_bwd(torch.ones(3, **cuda), q, d, lab, torch.zeros(3, **cuda),
                                                            torch.zeros(3, 2, **cuda), 0.05, True),
         r"row_stats must be a contiguous \[3, 2\]"),
        ("cl bwd col_stats", lambda: ops.contrastive_loss_bwd(torch.ones(3, **cuda), q, d, lab,
                                                              torch.zeros(3, 2, **cuda), torch.zeros(3, **cuda), 0.05,
                                                              True), "col_stats must be"),
        ("cl doc_chunk", lambda: ops.contrastive_loss_fwd(q, d, lab, 0.05, False, -1), "doc_chunk must be >= 0"),
        ("attn fp32", lambda: ops.memory_attention_fwd(a.float(), a.float(), a.float(), lens, False, 0.1),
         "float16/bfloat16"),
        ("attn head dim", lambda: ops.memory_attention_fwd(a[..., :32], a[..., :32], a[..., :32], lens, False, 0.1),
         "head dim must be 64 or 128"),
        ("attn stride", lambda: ops.memory_attention_fwd(torch.randn(1, 2, 64, 8, **cuda).half().transpose(2, 3), a,
                                                         a, lens, False, 0.1), "unit stride along the head dim"),
        ("attn misaligned", lambda: ops.memory_attention_fwd(
            torch.randn(1 * 2 * 8 * 64 + 1, **cuda).half()[1:].view(1, 2, 8, 64), a, a, lens, False, 0.1),
         "16-byte aligned"),
        ("attn heads", lambda: ops.memory_attention_fwd(torch.randn(1, 3, 8, 64, **cuda).half(), a, a, lens, False,
                                                        0.1), "multiple of kv heads"),
        ("attn cpu", lambda: ops.memory_attention_fwd(a.cpu(), a, a, lens, False, 0.1), "q must be a CUDA tensor"),
    ]


BAD_INPUT_NAMES = ["pool int hidden", "pool non-contiguous", "pool int32 start", "pool cpu length", "pool bwd L",
                   "cl dtype mismatch", "cl D mismatch", "cl labels length", "cl cpu queries", "cl bwd row_stats",
                   "cl bwd col_stats", "cl doc_chunk",
                   "attn fp32", "attn head dim", "attn stride", "attn misaligned", "attn heads", "attn cpu"]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_binding_rejects_bad_inputs(case):
    cases = {name: (call, match) for name, call, match in _bad_input_cases()}
    assert set(cases) == set(BAD_INPUT_NAMES)
    call, match = cases[case]
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.gpu
@needs_ext
def test_fake_kernels_match_the_real_ops():
    """torch.library.opcheck: schemas and fake (meta) kernels agree with the CUDA kernels."""
    for op in ("span_mean_pool", "contrastive_loss", "memory_attention"):
        importlib.import_module(f"llm2comp_kernels.{op}.cuda")  # registers the fake kernels
    hidden, start, length = make_pool_inputs(3, 6, 40, device="cuda", requires_grad=False)
    q, d = make_contrastive_inputs(5, 9, 24, device="cuda", requires_grad=False)
    labels = torch.arange(5, device="cuda")
    ops = torch.ops.llm2comp
    loss, row_stats, col_stats = ops.contrastive_loss_fwd(q, d, labels, 0.1, True)
    aq, ak, av, lens = make_attention_inputs(2, 4, 2, 20, 64, dtype=torch.float16, device="cuda",
                                             requires_grad=False)
    cases = [
        (ops.span_mean_pool_fwd.default, (hidden, start, length)),
        (ops.span_mean_pool_bwd.default, (torch.randn(3, 40, device="cuda"), start, length, 6)),
        (ops.contrastive_loss_fwd.default, (q, d, labels, 0.1, True)),
        (ops.contrastive_loss_bwd.default,
         (torch.ones(5, device="cuda"), q, d, labels, row_stats, col_stats, 0.1, True)),
        (ops.memory_attention_fwd.default, (aq, ak, av, lens.long(), True, 0.125)),
        (ops.memory_attention_fwd.default, (aq, ak, av, lens.long(), False, 0.125, True)),
        (ops.memory_attention_fwd.default, (aq, ak, av, lens.long(), False, 0.125, True, 8)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@needs_ext
def test_seq_lens_int32_and_backend_auto_follows_the_op_order():
    """int32 seq_lens reach the CUDA kernel; "auto" runs attention on CUDA for a short forward without gradient
    and on Triton otherwise (memory_attention.api.auto_order), pooling on CUDA."""
    q, k, v, _ = make_attention_inputs(2, 2, 2, 9, 64, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    seq_lens = seq_lens_mixed(2, 9, "cuda")
    assert seq_lens.dtype == torch.int32
    assert_rel_close(memory_attention(q, k, v, seq_lens, backend="cuda"),
                     memory_attention_reference(q.double(), k.double(), v.double(), seq_lens, False, 64 ** -0.5),
                     name="cuda")
    assert torch.equal(memory_attention(q, k, v, seq_lens, backend="auto"),
                       memory_attention(q, k, v, seq_lens, backend="cuda"))
    q.requires_grad_()
    assert torch.equal(memory_attention(q, k, v, seq_lens, backend="auto"),
                       memory_attention(q, k, v, seq_lens, backend="triton"))
    hidden, start, length = make_pool_inputs(3, 7, 16, dtype=torch.bfloat16, device="cuda", requires_grad=False)
    assert_rel_close(span_mean_pool(hidden, start, length, backend="auto"),
                     span_mean_pool(hidden, start, length, backend="cuda"), tol=0.0)
