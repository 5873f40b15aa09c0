"""The CPU emulator of tests/cuda_emulation itself, and the cuda backends' Python side on top of it.

- Each check the emulator claims (cpu_emulation.h) fires on a deliberately broken kernel (faulty_kernels.cpp).
- With the emulated kernels registered as `torch.ops.llm2comp.*` for CPU tensors (torch_ops.py, schemas read
  from csrc/bindings.cpp), llm2comp_kernels/<op>/cuda.py runs without a GPU: input layouts, autograd (the
  attention backward from the CUDA forward's log-sum-exps) and the fake kernels torch.compile traces with."""

from __future__ import annotations

import importlib

import pytest
import torch

from llm2comp_kernels._backends import cuda_extension, triton_interpret
from llm2comp_kernels.contrastive_loss.reference import contrastive_loss_reference
from llm2comp_kernels.memory_attention.reference import memory_attention_reference
from llm2comp_kernels.span_mean_pool.reference import span_mean_pool_reference
from llm2comp_kernels.testing import make_attention_inputs, make_contrastive_inputs, make_pool_inputs
from tests.cuda_emulation import EmulationError, call, torch_ops
from tests.utils import assert_rel_close

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
    (9, "no copy has written"),
])
@pytest.mark.parametrize("order", [0, 1], ids=["forward", "reverse"])
def test_emulator_reports_faults(emulated, bug, message, order):
    call(emulated, "emu_set_schedule", order, 0, False)
    with pytest.raises(EmulationError, match=message):
        call(emulated, "emu_faulty", bug, torch.zeros(5 * THREADS), 0.0)


def test_emulator_thread_orders_expose_a_missing_barrier(emulated):
    seen = []
    for order, salt in ((0, 100.0), (1, 200.0)):
        call(emulated, "emu_set_schedule", order, 0, False)
        buffer = torch.zeros(5 * THREADS)
        call(emulated, "emu_faulty", 0, buffer, salt)
        seen.append(torch.equal(buffer[:THREADS], (torch.arange(THREADS) - 1).clamp(min=0) + salt))
    assert seen == [True, False]  # the forward order happens to work, the reverse one reads stale slots


def test_emulator_copies_land_at_their_wait(emulated):
    buffer = torch.arange(5 * THREADS, dtype=torch.float32)
    call(emulated, "emu_faulty", 4, buffer, 0.0)
    assert buffer[4 * THREADS:].isnan().all()  # read before cp_async_wait: the poison of the shared memory
    call(emulated, "emu_set_schedule", 0, 0, True)
    buffer = torch.arange(5 * THREADS, dtype=torch.float32)
    call(emulated, "emu_faulty", 4, buffer, 0.0)
    assert torch.equal(buffer[4 * THREADS:], (torch.arange(THREADS) + 1) % THREADS * 4.0)


# ---- the cuda backends' Python side, over the emulated ops ------------------------------------------

OPS = ("span_mean_pool", "contrastive_loss", "memory_attention")
needs_interpreter = pytest.mark.skipif(not triton_interpret(),
                                       reason="the attention backward runs Triton kernels: TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def cuda_backends(_emulated_kernels):
    """torch.ops.llm2comp.* defined over the emulated kernels (schemas from bindings.cpp), and the ops' cuda
    modules imported on top: their layouts, autograd and fake kernels, on CPU tensors."""
    if cuda_extension() is not None:
        pytest.skip("the real extension is loaded here: test_cuda_extension.py covers the cuda backends")
    library = torch_ops.register(_emulated_kernels)
    yield {op: importlib.import_module(f"llm2comp_kernels.{op}.cuda") for op in OPS}
    library._destroy()


def test_emulated_ops_match_their_fake_kernels(cuda_backends):
    """The fake kernels of cuda.py (what torch.compile traces with) give the emulated ops' shapes and dtypes."""
    hidden, start, length = make_pool_inputs(3, 6, 40, requires_grad=False)
    q, d = make_contrastive_inputs(5, 9, 24, requires_grad=False)
    labels = torch.arange(5)
    ops = torch.ops.llm2comp
    loss, row_stats, col_stats = ops.contrastive_loss_fwd(q, d, labels, 0.1, True)
    aq, ak, av, lens = make_attention_inputs(2, 4, 2, 20, 64, dtype=torch.bfloat16, requires_grad=False)
    cases = [
        (ops.span_mean_pool_fwd.default, (hidden, start, length)),
        (ops.span_mean_pool_bwd.default, (torch.randn(3, 40), start, length, 6)),
        (ops.contrastive_loss_fwd.default, (q, d, labels, 0.1, True)),
        (ops.contrastive_loss_fwd.default, (q, d, labels, 0.1, False, 4)),
        (ops.contrastive_loss_bwd.default, (torch.ones(5), q, d, labels, row_stats, col_stats, 0.1, True)),
        (ops.memory_attention_fwd.default, (aq, ak, av, lens.long(), True, 0.125)),
        (ops.memory_attention_fwd.default, (aq, ak, av, lens.long(), False, 0.125, True)),
        (ops.memory_attention_fwd.default, (aq, ak, av, lens.long(), False, 0.125, True, 8)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_cuda_backend_memory_attention(cuda_backends, causal):
    """Forward on the CUDA kernel (q/k/v as transposed [B, L, H, d] views, read in place), saving its
    log-sum-exps; backward by the Triton kernels from them: output and gradients against float64."""
    q, k, v, seq_lens = make_attention_inputs(3, 4, 2, 70, 64, dtype=torch.bfloat16, requires_grad=False)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    attention = cuda_backends["memory_attention"].memory_attention_cuda
    out = attention(q, k, v, seq_lens, causal, 64 ** -0.5)
    with torch.no_grad():
        assert torch.equal(out, attention(q, k, v, seq_lens, causal, 64 ** -0.5))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    inputs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = memory_attention_reference(*inputs64, seq_lens, causal, 64 ** -0.5)
    ref_grads = torch.autograd.grad(ref, inputs64, grad.double())
    assert_rel_close(out, ref, name="out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_rel_close(g, r, name=f"d{name}")


def test_cuda_backend_span_mean_pool(cuda_backends):
    hidden, start, length = make_pool_inputs(4, 7, 24, dtype=torch.bfloat16)
    out = cuda_backends["span_mean_pool"].span_mean_pool_cuda(hidden, start.int(), length.int())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    (grad_hidden,) = torch.autograd.grad(out, hidden, grad)
    h64 = hidden.detach().double().requires_grad_()
    ref = span_mean_pool_reference(h64, start, length)
    (ref_grad,) = torch.autograd.grad(ref, h64, grad.double())
    assert_rel_close(out, ref, name="out")
    assert_rel_close(grad_hidden, ref_grad, name="grad_hidden")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_backend_contrastive_loss(cuda_backends, reduction, dtype):
    """Normalisation in torch, the loss in the emulated ops over three doc chunks, symmetric, repeated labels."""
    queries, docs = make_contrastive_inputs(21, 40, 24, dtype=dtype, positive_weight=0.15)
    labels = torch.arange(21).roll(2)
    labels[0] = labels[1]
    loss = cuda_backends["contrastive_loss"].contrastive_loss_cuda(queries, docs, labels, 0.05, True, True,
                                                                   reduction, doc_chunk=16)
    grad = torch.rand(loss.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    dq, dd = torch.autograd.grad(loss, (queries, docs), grad)
    q64, d64 = (x.detach().double().requires_grad_() for x in (queries, docs))
    ref = contrastive_loss_reference(q64, d64, labels, 0.05, normalize=True, symmetric=True, reduction=reduction)
    ref_dq, ref_dd = torch.autograd.grad(ref, (q64, d64), grad.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: unit vectors and dS rounded for the products
    assert_rel_close(loss, ref, tol=tol, name="loss")
    assert_rel_close(dq, ref_dq, tol=tol, name="dq")
    assert_rel_close(dd, ref_dd, tol=tol, name="dd")
