"""Second derivatives (``create_graph=True``, e.g. a gradient penalty): the kernel backends compute first
derivatives only, so going through their backward again must raise, not quietly drop their part of the
graph; the torch backends of memory_attention, span_mean_pool and contrastive_loss, which claim one, give the
right one (float64 gradgradcheck)."""

from __future__ import annotations

import pytest
import torch

from llm2comp_kernels import contrastive_loss, linear_kl_loss, memory_attention, span_mean_pool, testing
from tests.utils import backend_cases


def _attention(backend, device):  # bf16, d=64: what every kernel backend takes
    q, k, v, seq_lens = testing.make_attention_inputs(2, 4, 2, 9, 64, dtype=torch.bfloat16, device=device)
    return memory_attention(q, k, v, seq_lens, backend=backend).square().sum(), q


def _pool(backend, device):
    hidden, start, length = testing.make_pool_inputs(3, 9, 16, device=device)
    return span_mean_pool(hidden, start, length, backend=backend).square().sum(), hidden


def _contrastive(backend, device):
    q, d = testing.make_contrastive_inputs(4, 6, 16, device=device)
    return contrastive_loss(q, d, backend=backend), d


def _linear_kl(backend, device):
    student, teacher, weight = testing.make_linear_kl_inputs(5, 16, 33, device=device)
    return linear_kl_loss(student, teacher, weight, backend=backend), student


OPS = {"memory_attention": (_attention, "memory_attention_fwd"), "span_mean_pool": (_pool, "span_mean_pool_fwd"),
       "contrastive_loss": (_contrastive, "contrastive_loss_fwd"), "linear_kl_loss": (_linear_kl, None)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _second_derivative(op: str, backend: str) -> None:
    out, x = OPS[op][0](backend, DEVICE)
    (grad,) = torch.autograd.grad(out, x, create_graph=True)
    (out + grad.square().sum()).backward()


@pytest.mark.parametrize("op, backend", [
    pytest.param(op, case.values[0], marks=case.marks, id=f"{op}-{case.id}")
    for op, (_, cuda_op) in OPS.items()
    for case in backend_cases(cuda_op, backends=("triton", "cuda") if cuda_op else ("torch", "triton"))
])
def test_kernel_backends_refuse_a_second_derivative(op, backend):
    with pytest.raises(RuntimeError, match="first derivatives only .create_graph=True needs a second.: backend=.torch. "
                                           "of memory_attention, span_mean_pool and contrastive_loss gives one"):
        _second_derivative(op, backend)


def _attention_fn():
    q, k, v, seq_lens = testing.make_attention_inputs(2, 2, 1, 5, 8, dtype=torch.float64, seq_lens=torch.tensor([5, 3]))
    return (lambda q, k, v: memory_attention(q, k, v, seq_lens, backend="torch")), (q, k, v)


def _pool_fn():
    hidden, start, length = testing.make_pool_inputs(3, 7, 4, dtype=torch.float64)
    return (lambda hidden: span_mean_pool(hidden, start, length, backend="torch")), (hidden,)


def _contrastive_fn():
    q, d = testing.make_contrastive_inputs(3, 5, 4, dtype=torch.float64)
    return (lambda q, d: contrastive_loss(q, d, backend="torch")), (q, d)


@pytest.mark.parametrize("make", [_attention_fn, _pool_fn, _contrastive_fn], ids=lambda f: f.__name__[1:-3])
def test_torch_backends_give_the_second_derivative(make):
    fn, inputs = make()
    assert torch.autograd.gradgradcheck(fn, inputs)
