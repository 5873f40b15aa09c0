"""Tests of `contrastive_loss`: the torch reference against an explicit log-softmax formulation and
gradcheck, argument errors, and every backend (loss and gradients, upstream gradient not 1) against the
float64 torch backend, including duplicate labels, N > B, an all-equal batch and huge-norm embeddings."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llm2comp_kernels.contrastive_loss import contrastive_loss
from llm2comp_kernels.contrastive_loss.chunked import contrastive_loss_torch
from llm2comp_kernels.contrastive_loss.reference import contrastive_loss_reference
from llm2comp_kernels.testing import REL_TOL, make_contrastive_inputs, rel_err
from tests.utils import assert_rel_close, backend_cases

BACKENDS = backend_cases("contrastive_loss_fwd")
REDUCTIONS = ("mean", "sum", "none")


def _explicit(q, d, labels, temperature, normalize, symmetric, reduction):
    """Independent formulation: logits, ``lse - positive`` per row, the symmetric direction by a loop."""
    if normalize:
        q = q / q.norm(dim=-1, keepdim=True)
        d = d / d.norm(dim=-1, keepdim=True)
    s = q @ d.T / temperature
    per = torch.stack([torch.logsumexp(s[i], 0) - s[i, labels[i]] for i in range(len(labels))])
    if symmetric:
        back = torch.stack([torch.logsumexp(s[:, labels[i]], 0) - s[i, labels[i]] for i in range(len(labels))])
        per = 0.5 * (per + back)
    return {"mean": per.mean, "sum": per.sum, "none": lambda: per}[reduction]()


def rel_floor_denominator(ref):
    """||ref||, the denominator of the relative error (turns an absolute bound into a relative one)."""
    return ref.detach().double().norm().item()


def _labels(kind, B, N, device="cpu"):
    if kind == "default":
        return None
    # Custom labels with duplicates: every query points into the first half-ish of the docs, reversed.
    return (torch.arange(B, device=device).flip(0) * 7 % max(1, (N + 1) // 2)).long()


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("normalize, symmetric, reduction",
                         list(itertools.product([True, False], [True, False], REDUCTIONS)))
def test_reference_matches_explicit(normalize, symmetric, reduction):
    q, d = make_contrastive_inputs(5, 12, 8, dtype=torch.float64, requires_grad=False)
    labels = _labels("custom", 5, 12)
    ref = contrastive_loss_reference(q, d, labels, 0.1, normalize, symmetric, reduction)
    assert_rel_close(ref, _explicit(q, d, labels, 0.1, normalize, symmetric, reduction), 1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_gradcheck(symmetric):
    q, d = make_contrastive_inputs(3, 5, 4, dtype=torch.float64)
    labels = torch.tensor([1, 1, 4])
    assert torch.autograd.gradcheck(
        lambda a, b: contrastive_loss_reference(a, b, labels, 0.5, True, symmetric, "none"), (q, d))


# ---------------------------------------------------------------- the chunked torch backend


@pytest.mark.parametrize("symmetric, reduction", list(itertools.product([False, True], REDUCTIONS)))
@pytest.mark.parametrize("chunk_rows", [1, 4, 37])
def test_chunked_torch_backend_matches_reference(symmetric, reduction, chunk_rows):
    """Chunks of 1, of 4 (the last one partial) and one chunk, forward and backward in float64."""
    q, d = make_contrastive_inputs(37, 3 * 37 + 5, 24, dtype=torch.float64)
    labels = _labels("custom", 37, d.shape[0])
    out = contrastive_loss_torch(q, d, labels, 0.2, True, symmetric, reduction, chunk_rows=chunk_rows)
    ref = contrastive_loss_reference(q, d, labels, 0.2, True, symmetric, reduction)
    grad = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    got, expected = torch.autograd.grad(out, (q, d), grad), torch.autograd.grad(ref, (q, d), grad)
    assert_rel_close(out, ref, 1e-12)
    for g, e, name in zip(got, expected, ("grad queries", "grad docs")):
        assert_rel_close(g, e, 1e-12, name=name)


def test_chunked_torch_backend_gradcheck():
    q, d = make_contrastive_inputs(3, 5, 4, dtype=torch.float64)
    labels = torch.tensor([1, 1, 4])
    assert torch.autograd.gradcheck(
        lambda a, b: contrastive_loss_torch(a, b, labels, 0.5, True, True, "none", chunk_rows=2), (q, d))


@pytest.mark.parametrize("symmetric", [False, True])
def test_chunked_torch_backend_saves_no_similarity_matrix(symmetric):
    """Autograd keeps nothing of `B x N` size for backward (the reference keeps the whole matrix)."""
    B, N, D = 64, 96, 8
    q, d = make_contrastive_inputs(B, N, D)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        contrastive_loss_torch(q, d, torch.arange(B), 0.1, True, symmetric, "mean", chunk_rows=8)
        largest = max(saved)
        saved.clear()
        contrastive_loss_reference(q, d, torch.arange(B), 0.1, True, symmetric, "mean")
    assert largest <= N * D < B * N <= max(saved)


# ---------------------------------------------------------------- argument errors


def _args():
    return make_contrastive_inputs(3, 5, 4, requires_grad=False)


@pytest.mark.parametrize("make, kwargs, exc, match", [
    (lambda q, d: (q[0], d), {}, ValueError, "queries must have 2 dims"),
    (lambda q, d: (q, d[None]), {}, ValueError, "docs must have 2 dims"),
    (lambda q, d: (q.long(), d), {}, TypeError, "queries must be"),
    (lambda q, d: ("x", d), {}, TypeError, "queries must be a torch.Tensor"),
    (lambda q, d: (q, d.double()), {}, TypeError, "docs has dtype"),
    (lambda q, d: (q[:0], d), {}, ValueError, "queries is empty"),
    (lambda q, d: (q, d[:0]), {}, ValueError, "docs is empty"),
    (lambda q, d: (q[:, :0], d[:, :0]), {}, ValueError, "D >= 1"),
    (lambda q, d: (q, d[:, :3]), {}, ValueError, "hidden size"),
    (lambda q, d: (q, d[:2]), {}, ValueError, "at least"),
    (lambda q, d: (q, d), {"labels": torch.tensor([0, 5, 1])}, ValueError, r"labels\[1\]"),
    (lambda q, d: (q, d), {"labels": torch.tensor([0, -1, 1])}, ValueError, r"labels\[1\]"),
    (lambda q, d: (q, d), {"labels": torch.tensor([0, 1])}, ValueError, "labels must have length"),
    (lambda q, d: (q, d), {"labels": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "labels must be"),
    (lambda q, d: (q, d), {"temperature": 0.0}, ValueError, "temperature"),
    (lambda q, d: (q, d), {"temperature": -1.0}, ValueError, "temperature"),
    (lambda q, d: (q, d), {"temperature": math.nan}, ValueError, "temperature"),
    (lambda q, d: (q, d), {"reduction": "max"}, ValueError, "reduction"),
    (lambda q, d: (q, d), {"normalize": 1}, TypeError, "normalize must be a bool"),
    (lambda q, d: (q, d), {"symmetric": "yes"}, TypeError, "symmetric must be a bool"),
    (lambda q, d: (q, d), {"backend": "numpy"}, ValueError, "backend"),
])
def test_bad_arguments(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        contrastive_loss(*make(*_args()), **kwargs)


def test_labels_allow_fewer_docs_than_queries():
    q, d = _args()
    loss = contrastive_loss(q, d[:2], labels=torch.tensor([0, 1, 1]), backend="torch")
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a GPU")
def test_device_mismatch():
    q, d = _args()
    with pytest.raises(ValueError, match="must match"):
        contrastive_loss(q, d.cuda())


# ---------------------------------------------------------------- every backend vs the float64 reference


def _bf16_eager_err(q, d, labels, kwargs, grad):
    """Relative errors (loss, dq, dd) of the explicit formula computed entirely in bfloat16, the precision a
    plain torch bf16 implementation reaches: the kernels' bf16 bounds are derived from it."""
    qb, db = (x.detach().bfloat16().requires_grad_(True) for x in (q, d))
    q64, d64 = (x.detach().double().requires_grad_(True) for x in (q, d))
    out_b = _explicit(qb, db, labels, **kwargs)
    out_64 = _explicit(q64, d64, labels, **kwargs)
    out_b.backward(grad.bfloat16())
    out_64.backward(grad.double())
    return rel_err(out_b, out_64), rel_err(qb.grad, q64.grad), rel_err(db.grad, d64.grad)


def _check(backend, device, B, N, D, dtype, labels_kind, normalize, symmetric, reduction, inputs=None):
    q, d = inputs if inputs is not None else make_contrastive_inputs(B, N, D, dtype=dtype, device=device,
                                                                     requires_grad=False)
    labels = _labels(labels_kind, q.shape[0], d.shape[0], device)
    # Raw dot products of random inputs grow like D: temperature D keeps those logits O(1), so the softmax
    # is not saturated and the gradients are not vanishingly small.
    # For cosine logits, 0.2 rather than the 0.05 of training: with 3 docs and T = 0.05 the softmax is one-hot
    # to ~1e-5, and gradients that small are differences of O(1) fp32 terms (relative error ~1e-2 by cancellation
    # alone, whatever the kernel does).
    temperature = 0.2 if normalize else float(q.shape[1])
    kwargs = dict(temperature=temperature, normalize=normalize, symmetric=symmetric, reduction=reduction)
    qa, da = q.detach().requires_grad_(True), d.detach().requires_grad_(True)
    out = contrastive_loss(qa, da, labels=labels, backend=backend, **kwargs)
    assert out.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)  # losses are not rounded
    grad = (torch.rand(out.shape, generator=torch.Generator().manual_seed(2)) + 0.5).to(device)
    out.backward(grad.to(out.dtype))
    q64, d64 = q.detach().double().requires_grad_(True), d.detach().double().requires_grad_(True)
    full_labels = labels if labels is not None else torch.arange(q.shape[0], device=device)
    ref = contrastive_loss_reference(q64, d64, full_labels, **kwargs)
    ref.backward(grad.double())
    tols = [REL_TOL[q.dtype]] * 3
    if q.dtype == torch.bfloat16:
        tols = [max(1e-2, 2 * e) for e in _bf16_eager_err(q, d, full_labels, kwargs, grad)]
    # loss_i = lse_i - s_{i,l_i} cancels when the positive dominates (loss ~1e-5 with logits ~1/T): fp32
    # rounding of the logits then bounds the error absolutely, a few ulps of the largest logit per query.
    with torch.no_grad():
        q64n, d64n = (F.normalize(x, dim=-1) if normalize else x for x in (q64, d64))
        logit_max = (q64n @ d64n.T).abs().max().item() / temperature
    floor = 16 * torch.finfo(torch.float32).eps * logit_max * {"mean": 1, "sum": B, "none": math.sqrt(B)}[reduction]
    assert_rel_close(out, ref, tols[0] + floor / max(rel_floor_denominator(ref), 1e-30), name="loss")
    assert_rel_close(qa.grad, q64.grad, tols[1], name="grad queries")
    assert_rel_close(da.grad, d64.grad, tols[2], name="grad docs")


# (B, N-kind, labels, normalize, symmetric, reduction, dtype): a covering subset of the full product below,
# every value of every axis at least once and the hard combinations (duplicate labels + symmetric, N > B).
COVERING = [
    (1, "eq", "default", True, False, "mean", torch.float32),
    (1, "more", "custom", False, True, "none", torch.bfloat16),
    (3, "eq", "custom", True, True, "sum", torch.float32),
    (3, "more", "default", False, False, "none", torch.float32),
    (37, "more", "custom", True, True, "mean", torch.float32),
    (37, "eq", "default", False, True, "sum", torch.bfloat16),
    (37, "more", "custom", True, False, "none", torch.bfloat16),
]
D_TEST = 24  # not a multiple of the interpreter's BLOCK_K = 16: the last D chunk is partial


def _n(B, kind):
    return B if kind == "eq" else 3 * B + 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, n_kind, labels_kind, normalize, symmetric, reduction, dtype", COVERING)
def test_matches_reference(backend, B, n_kind, labels_kind, normalize, symmetric, reduction, dtype, device,
                           poison_empty):
    _check(backend, device, B, _n(B, n_kind), D_TEST, dtype, labels_kind, normalize, symmetric, reduction)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, n_kind, labels_kind, normalize, symmetric, reduction, dtype", list(itertools.product(
    [1, 3, 37], ["eq", "more"], ["default", "custom"], [True, False], [True, False], REDUCTIONS,
    [torch.float32, torch.bfloat16])))
def test_matches_reference_full(backend, B, n_kind, labels_kind, normalize, symmetric, reduction, dtype, device,
                                poison_empty):
    _check(backend, device, B, _n(B, n_kind), D_TEST, dtype, labels_kind, normalize, symmetric, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, device):
    """Non-contiguous queries/docs (every other column of wider buffers)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(7, 2 * D_TEST, generator=g)[:, ::2].to(device)
    d = torch.randn(9, 2 * D_TEST, generator=g)[:, ::2].to(device)
    _check(backend, device, 7, 9, D_TEST, torch.float32, "custom", True, True, "mean", inputs=(q, d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_all_equal_batch(backend, symmetric, device):
    """Identical queries and docs: every logit ties, the loss is log N (symmetric: the mean of log N and
    log B) and the gradient is zero (the reference's is zero up to rounding, so it is compared absolutely)."""
    q = torch.ones(5, D_TEST, device=device, requires_grad=True)
    d = torch.ones(6, D_TEST, device=device, requires_grad=True)
    loss = contrastive_loss(q, d, backend=backend, symmetric=symmetric)
    loss.backward()
    expected = 0.5 * (math.log(6) + math.log(5)) if symmetric else math.log(6)
    assert abs(loss.item() - expected) < 1e-4
    assert q.grad.abs().max() < 1e-5 and d.grad.abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_huge_norms_stay_finite(backend, symmetric, device):
    """Norm-1e4 embeddings, no normalisation, temperature 1: logits ~1e8, the softmax must not overflow."""
    q, d = make_contrastive_inputs(5, 8, D_TEST, device=device, requires_grad=False)
    q = (q / q.norm(dim=-1, keepdim=True) * 1e4).requires_grad_(True)
    d = (d / d.norm(dim=-1, keepdim=True) * 1e4).requires_grad_(True)
    loss = contrastive_loss(q, d, backend=backend, normalize=False, symmetric=symmetric, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all()
    ref = contrastive_loss_reference(q.detach().double(), d.detach().double(), torch.arange(5, device=device),
                                     1.0, False, symmetric, "mean")
    assert abs(loss.item() - ref.item()) <= 1e-3 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_fp16_loss_scaling(backend, symmetric, device):
    """float16 under loss scaling (2**15: GradScaler's 65536 after one backoff), mean over B=4: each query's
    upstream gradient is 8192, so the logit gradients times 1/T = 20 exceed float16's range (65504) although the
    input gradients do not (norms ~100 divide them): 1/T must be applied after the low-precision product."""
    q, d = make_contrastive_inputs(4, 6, D_TEST, device=device, positive_weight=0.15, requires_grad=False)
    q, d = ((20 * x).half().requires_grad_() for x in (q, d))
    loss = contrastive_loss(q, d, temperature=0.05, backend=backend, symmetric=symmetric)
    (loss * 2**15).backward()
    q64, d64 = (x.detach().double().requires_grad_() for x in (q, d))
    ref = contrastive_loss_reference(q64, d64, torch.arange(4, device=device), 0.05, True, symmetric, "mean")
    (ref * 2**15).backward()
    for got, want in ((q.grad, q64.grad), (d.grad, d64.grad)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < REL_TOL[torch.float16]


@pytest.mark.parametrize("rows, cols", [(1024, 1024), (16, 40), (65536, 65536), (3000, 7)])
def test_triton_splits_fill_the_gpu(rows, cols):
    """The split count of the Triton kernels: about two programs per SM, never more splits than tiles to split,
    one when the row blocks alone fill a 132-SM GPU; three under the interpreter (the tests cover combining)."""
    pytest.importorskip("triton")
    from llm2comp_kernels.contrastive_loss.triton import _FIXED, _splits_for

    assert _splits_for(rows, "BLOCK_M", cols, "BLOCK_N", None) == 3
    splits = _splits_for(rows, "BLOCK_M", cols, "BLOCK_N", 132)  # fixed blocks: this test runs without autotuning
    row_programs, col_tiles = math.ceil(rows / _FIXED["BLOCK_M"]), math.ceil(cols / _FIXED["BLOCK_N"])
    assert 1 <= splits <= col_tiles
    assert row_programs * splits >= 2 * 132 or splits == col_tiles
    assert row_programs * (splits - 1) < 2 * 132


@pytest.mark.parametrize("B, N, itemsize", [(8192, 8192, 2), (32768, 32768, 2), (32768, 65536, 4), (10**6, 10**6, 2),
                                            (100, 7, 2), (3000, 65536, 2)])
def test_triton_doc_chunks_fit_the_workspace(B, N, itemsize, monkeypatch):
    """Docs per backward chunk on a GPU: whole multiples of 256 (or all N), the `[B, C]` dS block within the
    workspace unless 256 docs alone exceed it, and no more chunks than that bound needs."""
    pytest.importorskip("triton")
    from llm2comp_kernels.contrastive_loss import triton as backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    chunk = backend._doc_chunk(B, N, itemsize)
    budget = backend._DS_WORKSPACE_BYTES
    assert 1 <= chunk <= N
    assert chunk == N or chunk % 256 == 0
    assert B * chunk * itemsize <= max(budget, B * 256 * itemsize)
    assert chunk == N or B * (chunk + 256) * itemsize > budget
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend._doc_chunk(B, N, itemsize) == min(N, backend._INTERPRET_CHUNK)


@pytest.mark.parametrize("B, N", [(8192, 8192), (32768, 32768), (65536, 65536), (300, 10**6), (100, 7)])
def test_triton_query_chunks_fit_the_workspace(B, N, monkeypatch):
    """Queries per launch of the symmetric forward on a GPU: whole multiples of 256 (or all B), their column
    statistics (an fp32 pair per query block of the smallest tuned block and doc) within the workspace unless
    256 queries alone exceed it; 32k x 32k needs one launch."""
    pytest.importorskip("triton")
    from llm2comp_kernels.contrastive_loss import triton as backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "1")
    chunk = backend._query_chunk(B, N)
    block = backend._smallest("BLOCK_M")
    assert 1 <= chunk <= B and (chunk == B or chunk % 256 == 0)
    assert 8 * N * math.ceil(chunk / block) <= max(backend._DS_WORKSPACE_BYTES, 8 * N * 256 // block)
    assert chunk == B or 8 * N * ((chunk + 256) // block) > backend._DS_WORKSPACE_BYTES
    if B == N == 32768:
        assert chunk == B


@pytest.mark.gpu
def test_triton_repeats_bitwise(device, monkeypatch):
    """Nothing in the Triton backend adds atomically: B = N = 1024 splits the forward's doc loop across
    programs and (with a 1 MiB dS workspace) runs the backward in two doc chunks, and two runs agree to the bit."""
    from llm2comp_kernels.contrastive_loss import triton as backend

    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(backend, "_DS_WORKSPACE_BYTES", 1 << 20)
    q, d = make_contrastive_inputs(1024, 1024, 256, dtype=torch.bfloat16, device=device, positive_weight=0.15)
    grads = []
    for _ in range(2):
        q.grad = d.grad = None
        contrastive_loss(q, d, backend="triton", symmetric=True).backward()
        grads.append((q.grad.clone(), d.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_backward_in_many_doc_chunks(dtype, device, monkeypatch):
    """A 1 MiB workspace splits the backward's N = 4133 docs into 17 chunks of 256 (the last one partial) and the
    symmetric forward's B = 2048 queries into 8 chunks of 256: loss and gradients still match the float64
    reference, duplicate labels and the symmetric column terms included."""
    from llm2comp_kernels.contrastive_loss import triton as backend

    monkeypatch.setattr(backend, "_DS_WORKSPACE_BYTES", 1 << 20)
    assert backend._doc_chunk(2048, 4133, 2) == 256
    assert backend._query_chunk(2048, 4133) == 256
    _check("triton", device, 2048, 4133, 1024, dtype, "custom", True, True, "mean")


@pytest.mark.gpu
def test_triton_backward_without_fp32_addmm(device, monkeypatch):
    """Where addmm cannot add the fp32 product of bf16 operands into the fp32 dq (torch 2.8/2.9), the backward adds a
    separate product: forced here whatever this torch supports, over 17 doc chunks, against the float64 reference."""
    from llm2comp_kernels import _matmul
    from llm2comp_kernels.contrastive_loss import triton as backend

    monkeypatch.setattr(_matmul, "_addmm_takes_fp32_accumulator", lambda device: False)
    monkeypatch.setattr(backend, "_DS_WORKSPACE_BYTES", 1 << 20)
    _check("triton", device, 2048, 4133, 1024, torch.bfloat16, "custom", True, True, "mean")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_realistic_size(backend, dtype, symmetric, device, monkeypatch):
    """Retrieval-training shape: B=4096 queries, N=8192 docs (hard negatives), D=1024, duplicate labels;
    autotuned, as users run it."""
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "1")
    _check(backend, device, 4096, 8192, 1024, dtype, "custom", True, symmetric, "mean")
