"""The benchmarks' peers compute our losses, configured exactly as the benchmarks configure them, so that their
timings compare like with like: Liger-Kernel's fused linear JSD (`bench_linear_kl_loss._liger`) is
`linear_kl_loss`, Inf-CL's `cal_inf_loss` (`bench_contrastive_loss._inf_cl`) is `contrastive_loss`.

Liger's chunked losses are plain torch, so its check runs on the CPU (the test extra installs liger-kernel);
Inf-CL's Triton kernels need CUDA."""

from __future__ import annotations

import pytest
import torch

from llm2comp_kernels import contrastive_loss, linear_kl_loss
from llm2comp_kernels.testing import make_contrastive_inputs, make_linear_kl_inputs, rel_err


def _loss_and_grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves if x.requires_grad]


def test_liger_configuration_is_linear_kl_loss():
    pytest.importorskip("liger_kernel")
    from benchmarks.bench_linear_kl_loss import _liger

    student, teacher, weight = make_linear_kl_inputs(37, 32, 1031)  # odd sizes; teacher needs no grad
    peer_loss, peer_grads = _loss_and_grads(_liger(), student, teacher, weight)
    loss, grads = _loss_and_grads(lambda s, t, w: linear_kl_loss(s, t, w, backend="torch"), student, teacher, weight)
    assert rel_err(peer_loss, loss) < 1e-5
    for peer_grad, grad in zip(peer_grads, grads):
        assert rel_err(peer_grad, grad) < 1e-5


@pytest.mark.gpu
def test_inf_cl_configuration_is_contrastive_loss():
    pytest.importorskip("inf_cl")
    from benchmarks.bench_contrastive_loss import POSITIVE_WEIGHT, TEMPERATURE, _inf_cl

    # D a multiple of Inf-CL's head_dim (256); fp32 inputs, which Inf-CL's dots read as TF32: hence the bounds.
    q, d = make_contrastive_inputs(320, 320, 512, device="cuda", positive_weight=POSITIVE_WEIGHT)
    labels = torch.arange(320, device="cuda")
    peer_loss, peer_grads = _loss_and_grads(_inf_cl(torch.device("cuda")), q, d, labels)
    loss, grads = _loss_and_grads(lambda a, b, _: contrastive_loss(a, b, temperature=TEMPERATURE, backend="torch"),
                                  q, d, labels)
    assert rel_err(peer_loss, loss) < 2e-3
    for peer_grad, grad in zip(peer_grads, grads):
        assert rel_err(peer_grad, grad) < 5e-2
