"""The CUDA kernels of csrc/ run on the CPU: compiled by the host compiler against tests/cuda_emulation (one
fiber per CUDA thread, warp collectives and the PTX of mma/ldmatrix/cp.async emulated) and compared with the
float64 references. This checks the kernels' index arithmetic, fragment layouts, barriers and copy pipeline
on every machine; speed, and the compiled code itself, still need the `gpu` tests of test_cuda_extension.py.

Every tensor a kernel sees sits inside a buffer of 0xff bytes (NaN, or -1 for integers), so a read past it
shows as NaN and a write past it as changed guard bytes."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from llm2comp_kernels.contrastive_loss.reference import contrastive_loss_reference
from llm2comp_kernels.memory_attention.reference import memory_attention_reference
from llm2comp_kernels.span_mean_pool.reference import span_mean_pool_reference
from llm2comp_kernels.testing import make_attention_inputs, make_contrastive_inputs, make_pool_inputs, rel_err
from tests import cuda_emulation
from tests.cuda_emulation import DTYPE_CODES, EmulationError, call
from tests.utils import assert_rel_close

GUARD_BYTES = 256
# (order, land cp.async copies when issued): forward/reverse/shuffled thread order, each with copies landing
# at their wait (catches reads before the wait) and at issue (catches overwrites of a tile still being read).
SCHEDULES = [(order, at_issue) for at_issue in (False, True) for order in (0, 1, 2)]


@pytest.fixture(scope="module")
def lib():
    try:
        return cuda_emulation.load()
    except cuda_emulation.Unavailable as e:
        pytest.skip(f"CUDA kernels cannot be emulated here: {e}")


@pytest.fixture(autouse=True)
def default_schedule(lib):
    call(lib, "emu_set_schedule", 0, 0, False)


class Guards:
    """Places tensors inside 0xff-filled buffers and checks afterwards that nothing wrote past them."""

    def __init__(self):
        self.buffers = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of x inside a guarded buffer (16-byte aligned, like the allocator's)."""
        pad = GUARD_BYTES // x.element_size()
        buffer = torch.empty(x.numel() + 2 * pad, dtype=x.dtype)
        buffer.view(torch.uint8).fill_(0xFF)
        inner = buffer[pad:pad + x.numel()].view(x.shape)
        inner.copy_(x)
        self.buffers.append((buffer, pad, x.numel()))
        return inner

    def check(self) -> None:
        for buffer, pad, n in self.buffers:
            for side in (buffer[:pad], buffer[pad + n:]):
                assert bool((side.view(torch.uint8) == 0xFF).all()), "a kernel wrote outside its tensor"


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


# ---- memory_attention --------------------------------------------------------------------------------


def run_attention(lib, q, k, v, seq_lens, causal, layout="bhld"):
    """The emulated CUDA forward on guarded copies; layout "blhd" passes q/k/v as transposed views of
    [B, L, H, d] tensors (strides the binding accepts)."""
    guards = Guards()
    B, Hq, L, d = q.shape

    def place(x):
        if layout == "blhd":
            return guards(x.transpose(1, 2).contiguous()).transpose(1, 2)
        return guards(x.contiguous())

    qg, kg, vg = place(q), place(k), place(v)
    out = guards(nan_like(q))
    strides = torch.tensor([s for x in (qg, kg, vg) for s in x.stride()[:3]], dtype=torch.int64)
    call(lib, "emu_memory_attention_fwd", DTYPE_CODES[q.dtype], qg, kg, vg, guards(seq_lens.long()), out, B, Hq,
         k.shape[1], L, d, strides, causal, d ** -0.5)
    guards.check()
    return out


def check_attention(out, q, k, v, seq_lens, causal):
    """Error vs float64 at most twice that of the reference computed in q's dtype (which rounds only the
    output); padded rows exactly zero."""
    d = q.shape[-1]
    exact = memory_attention_reference(q.double(), k.double(), v.double(), seq_lens, causal, d ** -0.5)
    same_dtype = memory_attention_reference(q, k, v, seq_lens, causal, d ** -0.5)
    assert torch.isfinite(out).all(), "NaN or inf in the output (a tile read before it was written?)"
    assert rel_err(out, exact) <= 2 * rel_err(same_dtype, exact) + 1e-6, (rel_err(out, exact),
                                                                          rel_err(same_dtype, exact))
    for b, n in enumerate(seq_lens.tolist()):
        assert bool((out[b, :, n:] == 0).all()), f"padded rows of batch row {b} are not zero"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("L,Hq,Hkv", [(1, 4, 4), (17, 6, 2), (64, 8, 1), (130, 6, 2)])
def test_memory_attention(lib, L, Hq, Hkv, d, causal, dtype):
    q, k, v, seq_lens = make_attention_inputs(3, Hq, Hkv, L, d, dtype=dtype, requires_grad=False)
    check_attention(run_attention(lib, q, k, v, seq_lens, causal), q, k, v, seq_lens, causal)


@pytest.mark.parametrize("order,at_issue", SCHEDULES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_memory_attention_schedules(lib, order, at_issue, causal):
    """Lengths on either side of the 64-key blocks, one over five blocks (the cp.async double buffer), and
    lengths that leave whole warps of a query block idle; non-contiguous [B, L, H, d] views."""
    call(lib, "emu_set_schedule", order, 7, at_issue)
    seq_lens = torch.tensor([63, 64, 65, 129, 300])
    q, k, v, _ = make_attention_inputs(5, 2, 1, 300, 64, dtype=torch.bfloat16, requires_grad=False)
    out = run_attention(lib, q, k, v, seq_lens, causal, layout="blhd")
    check_attention(out, q, k, v, seq_lens, causal)


@pytest.mark.parametrize("d", [64, 128])
def test_memory_attention_ldmatrix_is_conflict_free(lib, d):
    """The row padding of the shared-memory tiles (kPad) puts the 8 rows of every ldmatrix phase, Q, K and
    transposed V alike, in distinct banks: one wavefront per phase."""
    q, k, v, seq_lens = make_attention_inputs(1, 1, 1, 130, d, dtype=torch.bfloat16, requires_grad=False,
                                              seq_lens=torch.tensor([130]))
    counts = torch.zeros(2, dtype=torch.int64)
    lib.emu_take_ldmatrix_counts(ctypes.c_void_p(counts.data_ptr()))
    run_attention(lib, q, k, v, seq_lens, False)
    lib.emu_take_ldmatrix_counts(ctypes.c_void_p(counts.data_ptr()))
    phases, wavefronts = counts.tolist()
    assert phases > 0 and wavefronts == phases, f"{wavefronts} wavefronts for {phases} ldmatrix phases"


def test_memory_attention_unsupported_head_dim(lib):
    q, k, v, seq_lens = make_attention_inputs(1, 2, 2, 8, 80, dtype=torch.bfloat16, requires_grad=False)
    with pytest.raises(EmulationError, match="cudaError_t"):
        run_attention(lib, q, k, v, seq_lens, False)


# ---- span_mean_pool ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("D", [13, 40, 300, 1032])  # scalar path, vector path, several D-tiles of each
def test_span_mean_pool(lib, D, dtype):
    hidden, start, length = make_pool_inputs(5, 9, D, dtype=dtype, requires_grad=False)
    start[0], length[0] = 0, 9   # the whole row
    start[1], length[1] = 8, 1   # the last position alone
    guards = Guards()
    h, s, n = guards(hidden), guards(start), guards(length)
    out = guards(torch.full((5, D), float("nan"), dtype=dtype))
    call(lib, "emu_span_mean_pool_fwd", DTYPE_CODES[dtype], h, s, n, out, 5, 9, D)
    ref = span_mean_pool_reference(hidden.double(), start, length)
    assert_rel_close(out, ref, tol=2 * rel_err(ref.to(dtype), ref) + 1e-7)

    grad_out = torch.randn(5, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad_hidden = guards(nan_like(hidden))
    call(lib, "emu_span_mean_pool_bwd", DTYPE_CODES[dtype], guards(grad_out), s, n, grad_hidden, 5, 9, D)
    guards.check()
    pos = torch.arange(9)
    inside = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    expected = torch.where(inside[..., None], grad_out.float()[:, None] * (1.0 / length.float())[:, None, None], 0.0)
    assert torch.equal(grad_hidden, expected.to(dtype))


# ---- contrastive_loss --------------------------------------------------------------------------------

LOG2E = 1.0 / math.log(2.0)


def emulated_contrastive(lib, queries, docs, labels, temperature, symmetric, chunk, grad):
    """The binding's chunk loop (csrc/bindings.cpp) in Python: fp32 logits blocks by torch.mm, everything
    else by the emulated kernels. Returns the per-query losses and the fp32 gradients of queries and docs."""
    guards = Guards()
    B, N = len(queries), len(docs)
    scale_log2 = LOG2E / temperature
    labels_g = guards(labels)
    loss = guards(torch.full((B,), float("nan")))
    row_stats = guards(torch.full((B, 2), float("nan")))
    col_stats = guards(torch.full((N, 2), float("nan"))) if symmetric else None
    blocks = [(n0, (queries.float() @ docs[n0:n0 + chunk].float().T).contiguous()) for n0 in range(0, N, chunk)]
    for n0, logits in blocks:
        x = guards(logits)
        call(lib, "emu_contrastive_loss_block_stats", x, B, x.shape[1], n0, scale_log2, n0 == 0, row_stats,
             labels_g, loss)
        if symmetric:
            call(lib, "emu_contrastive_loss_col_stats", x, B, x.shape[1], scale_log2, col_stats[n0:])
    call(lib, "emu_contrastive_loss_finalize", row_stats, col_stats, labels_g, loss, B)

    g = guards(grad)
    w_row = guards(torch.full((B,), float("nan")))
    w_col = guards(torch.zeros(N)) if symmetric else None
    call(lib, "emu_contrastive_loss_weights", g, labels_g, w_row, w_col, B)
    dq, dd = torch.zeros(B, queries.shape[1]), torch.empty(N, queries.shape[1])
    for n0, logits in blocks:
        x = guards(logits)
        # float32: dS overwrites the logits in place, as in the binding.
        ds = x if queries.dtype == torch.float32 else guards(torch.full(x.shape, float("nan"), dtype=queries.dtype))
        call(lib, "emu_contrastive_loss_block_dlogits", DTYPE_CODES[queries.dtype], x, ds, B, x.shape[1], n0,
             scale_log2, row_stats, w_row, col_stats, w_col, labels_g, g)
        dq += ds.float() @ docs[n0:n0 + chunk].float() / temperature
        dd[n0:n0 + chunk] = ds.float().T @ queries.float() / temperature
    guards.check()
    return loss, dq, dd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "symmetric"])
@pytest.mark.parametrize("B,N,chunk", [(1, 1, 256), (37, 37, 16), (37, 116, 50), (300, 300, 256)])
def test_contrastive_loss(lib, B, N, chunk, symmetric, dtype):
    queries, docs = make_contrastive_inputs(B, N, 24, dtype=dtype, requires_grad=False, positive_weight=0.15)
    labels = torch.arange(B)
    if B > 1:
        labels = labels.roll(1)
        labels[0] = labels[1]  # a repeated positive: two queries feed one doc's column weight
    grad = torch.rand(B, generator=torch.Generator().manual_seed(3))
    loss, dq, dd = emulated_contrastive(lib, queries, docs, labels, 0.05, symmetric, chunk, grad)

    q64 = queries.double().requires_grad_()
    d64 = docs.double().requires_grad_()
    ref = contrastive_loss_reference(q64, d64, labels, 0.05, normalize=False, symmetric=symmetric, reduction="none")
    ref.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: dS is rounded to bf16 for the gradient GEMMs
    assert_rel_close(loss, ref, tol=1e-5, name="loss")
    assert_rel_close(dq, q64.grad, tol=tol, name="dq")
    assert_rel_close(dd, d64.grad, tol=tol, name="dd")


def test_contrastive_loss_extreme_inputs(lib):
    """An all-equal batch of huge vectors: logits near 1e8 / T, yet finite losses (log N) and gradients."""
    queries = torch.full((9, 16), 3e3)
    loss, dq, dd = emulated_contrastive(lib, queries, queries.clone(), torch.arange(9), 0.05, True, 256,
                                        torch.ones(9))
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all() and torch.isfinite(dd).all()
    assert_rel_close(loss, torch.full((9,), math.log(9.0)), tol=1e-6)


def test_contrastive_loss_doc_chunk(lib):
    chunk = lib.emu_contrastive_loss_doc_chunk
    assert chunk(1024, 100_000, 4) == (128 << 20) // (1024 * 4)  # the 128 MiB budget, a multiple of 256
    assert chunk(1024, 1000, 4) == 1000                          # never more than N
    assert chunk(1 << 20, 100_000, 6) == 256                     # at least 256 however large B
    assert chunk(1 << 20, 100, 6) == 100


# ---- the emulator itself -----------------------------------------------------------------------------

THREADS = 64  # faulty_kernels.cpp


@pytest.mark.parametrize("bug,message", [
    (1, "deadlock in block"),
    (2, "exit"),
    (3, "not 16-byte aligned"),
    (5, "never waited for"),
    (6, "cudaFuncSetAttribute"),
    (7, "shared-memory race"),
    (8, r"shared-memory race \(write after read\)"),
])
@pytest.mark.parametrize("order", [0, 1], ids=["forward", "reverse"])
def test_emulator_reports_faults(lib, bug, message, order):
    call(lib, "emu_set_schedule", order, 0, False)
    with pytest.raises(EmulationError, match=message):
        call(lib, "emu_faulty", bug, torch.zeros(5 * THREADS), 0.0)


def test_emulator_thread_orders_expose_a_missing_barrier(lib):
    seen = []
    for order, salt in ((0, 100.0), (1, 200.0)):
        call(lib, "emu_set_schedule", order, 0, False)
        buffer = torch.zeros(5 * THREADS)
        call(lib, "emu_faulty", 0, buffer, salt)
        seen.append(torch.equal(buffer[:THREADS], (torch.arange(THREADS) - 1).clamp(min=0) + salt))
    assert seen == [True, False]  # the forward order happens to work, the reverse one reads stale slots


def test_emulator_copies_land_at_their_wait(lib):
    buffer = torch.arange(5 * THREADS, dtype=torch.float32)
    call(lib, "emu_faulty", 4, buffer, 0.0)
    assert buffer[4 * THREADS:].isnan().all()  # read before cp_async_wait: the poison of the shared memory
    call(lib, "emu_set_schedule", 0, 0, True)
    buffer = torch.arange(5 * THREADS, dtype=torch.float32)
    call(lib, "emu_faulty", 4, buffer, 0.0)
    assert torch.equal(buffer[4 * THREADS:], (torch.arange(THREADS) + 1) % THREADS * 4.0)
