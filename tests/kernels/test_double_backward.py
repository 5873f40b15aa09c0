"""Second derivatives (``create_graph=True``, e.g. a gradient penalty): the kernel backends compute first
derivatives only, so going through their backward again must raise, not quietly drop their part of the
graph; the torch references of the elementwise-autograd ops keep working."""

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


@pytest.mark.parametrize("op", ["memory_attention", "span_mean_pool", "contrastive_loss"])
def test_torch_references_give_a_second_derivative(op):
    _second_derivative(op, "torch")
