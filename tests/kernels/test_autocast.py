"""The matrix ops under `torch.autocast` (CPU autocast here; CUDA autocast takes the same path): inputs cast to the
autocast dtype, then the same result and gradients as a call made in that dtype without autocast; the contrastive
loss, a loss like cross-entropy, and span_mean_pool, a mean, run on their inputs as given."""

from __future__ import annotations

import pytest
import torch

from llm2comp_kernels import contrastive_loss, linear_kl_loss, memory_attention, span_mean_pool


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def test_memory_attention_mixed_dtypes_under_autocast():
    # What a transformers layer hands the attention under autocast: fp32 q/k (rotary embedding) and a bf16 v.
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    v = torch.randn(2, 2, 9, 16).bfloat16()
    seq_lens = torch.tensor([9, 4])
    q1, k1, v1 = _leaves(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = memory_attention(q1, k1, v1, seq_lens)
    out.float().square().sum().backward()
    q2, k2, v2 = _leaves(q.bfloat16(), k.bfloat16(), v)
    expected = memory_attention(q2, k2, v2, seq_lens)
    expected.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert q1.grad.dtype == torch.float32  # the cast's backward returns the leaf's dtype
    torch.testing.assert_close(q1.grad, q2.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(k1.grad, k2.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(v1.grad, v2.grad, rtol=0, atol=0)


def test_linear_kl_loss_under_autocast():
    torch.manual_seed(0)
    student, teacher, weight = torch.randn(5, 16), torch.randn(5, 16), torch.randn(31, 16)
    s1, w1 = _leaves(student, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_kl_loss(s1, teacher, w1)
    loss.backward()
    s2, w2 = _leaves(student.bfloat16(), weight.bfloat16())
    expected = linear_kl_loss(s2, teacher.bfloat16(), w2)
    expected.backward()
    assert loss.dtype == torch.float32  # a loss, not rounded to the autocast dtype
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(s1.grad, s2.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(w1.grad, w2.grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_loss_ignores_autocast(symmetric):
    """The torch backend's similarity product stays fp32 under bf16 autocast (it was bf16: 0.2% off in the loss,
    0.7% in the gradients), as the kernel backends' products are."""
    torch.manual_seed(0)
    queries, docs = torch.randn(6, 32), torch.randn(9, 32)
    q1, d1 = _leaves(queries, docs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(q1, d1, symmetric=symmetric, backend="torch")
    loss.backward()
    q2, d2 = _leaves(queries, docs)
    expected = contrastive_loss(q2, d2, symmetric=symmetric, backend="torch")
    expected.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(q1.grad, q2.grad, rtol=0, atol=0)
    torch.testing.assert_close(d1.grad, d2.grad, rtol=0, atol=0)


def test_span_mean_pool_ignores_autocast():
    """A mean, not a matrix product: fp32 under bf16 autocast on the torch backend too (its einsum ran in bf16:
    2e-3 off, found by fuzzing), as on the kernel backends."""
    torch.manual_seed(0)
    hidden, start, length = torch.randn(2, 8, 64), torch.tensor([0, 2]), torch.tensor([3, 5])
    (h1,) = _leaves(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = span_mean_pool(h1, start, length, backend="torch")
    out.square().sum().backward()
    (h2,) = _leaves(hidden)
    expected = span_mean_pool(h2, start, length, backend="torch")
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=0)


def test_float64_and_autocast_off_run_as_given():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert memory_attention(q, q, q, torch.tensor([5])).dtype == torch.float64
    assert memory_attention(q.float(), q.float(), q.float(), torch.tensor([5])).dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["linear_kl_loss", "contrastive_loss"])
def test_losses_of_bf16_inputs_are_fp32(op, backend):
    """The two losses of bf16 inputs: the fp32 value computed from them (not rounded to bf16's 3 digits), and a
    gradient weight w (a micro-batch's token count) that reaches the gradients as w, not as bf16(w)."""
    torch.manual_seed(0)
    if op == "linear_kl_loss":
        inputs = [torch.randn(40, 32).bfloat16(), torch.randn(40, 32).bfloat16(), torch.randn(97, 32).bfloat16()]
        run = lambda s, t, w: linear_kl_loss(s, t, w, backend=backend)  # noqa: E731
        grad_of = (0, 2)
    else:
        inputs = [torch.randn(40, 32).bfloat16(), torch.randn(60, 32).bfloat16()]
        run = lambda q, d: contrastive_loss(q, d, temperature=1.0, backend=backend)  # noqa: E731  (spread softmax)
        grad_of = (0, 1)
    leaves = _leaves(*inputs)
    loss = run(*leaves)
    assert loss.dtype == torch.float32
    assert loss.item() != loss.bfloat16().item()  # not a bf16 value
    torch.testing.assert_close(loss, run(*[x.float() for x in inputs]), rtol=1e-4, atol=0)  # bf16 rounds 4e-3
    weight = 1027.0  # bf16(1027) = 1024: a bf16 loss scaled every gradient by 0.29% less
    grads = torch.autograd.grad(loss, [leaves[i] for i in grad_of], retain_graph=True)
    weighted = torch.autograd.grad(loss * weight, [leaves[i] for i in grad_of])
    for g, gw in zip(grads, weighted):
        ratio = gw.float().norm() / g.float().norm()
        assert abs(ratio / weight - 1) < 1e-3, ratio  # the rest: rounding the gradients to bf16 (up to 4e-4 seen)
