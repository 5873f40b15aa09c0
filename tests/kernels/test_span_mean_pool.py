"""Tests of `span_mean_pool`: the torch reference against a per-row loop and gradcheck, argument errors, and
every backend (output and gradient) against the float64 torch backend."""

from __future__ import annotations

import math

import pytest
import torch

from llm2comp_kernels.span_mean_pool import span_mean_pool
from llm2comp_kernels.span_mean_pool.reference import span_mean_pool_reference
from llm2comp_kernels.testing import make_pool_inputs
from tests.utils import assert_rel_close, backend_cases

BACKENDS = backend_cases("span_mean_pool_fwd")



def _loop_pool(hidden, start, length):
    """The naive formulation: one ``hidden[b, s:s+l].mean(0)`` per row."""
    rows = [hidden[b, int(start[b]): int(start[b]) + int(length[b])].mean(0) for b in range(hidden.shape[0])]
    return torch.stack(rows)


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("B, L, D", [(1, 1, 1), (5, 11, 7), (4, 16, 33)])
def test_reference_matches_loop(B, L, D):
    hidden, start, length = make_pool_inputs(B, L, D, dtype=torch.float64, requires_grad=False)
    assert_rel_close(span_mean_pool_reference(hidden, start, length), _loop_pool(hidden, start, length), 1e-12)


def test_reference_gradcheck():
    hidden, start, length = make_pool_inputs(3, 6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h: span_mean_pool_reference(h, start, length), (hidden,))


# ---------------------------------------------------------------- argument errors


def _args():
    hidden, start, length = make_pool_inputs(3, 6, 4, requires_grad=False)
    return hidden, start, length


@pytest.mark.parametrize("make, exc, match", [
    (lambda h, s, n: (h[0], s, n), ValueError, "hidden must have 3 dims"),
    (lambda h, s, n: (h.long(), s, n), TypeError, "hidden must be"),
    (lambda h, s, n: ("x", s, n), TypeError, "hidden must be a torch.Tensor"),
    (lambda h, s, n: (h, s.float(), n), TypeError, "start must be"),
    (lambda h, s, n: (h, s, n[:, None]), ValueError, "length must have 1 dims"),
    (lambda h, s, n: (h[:0], s[:0], n[:0]), ValueError, "hidden is empty"),
    (lambda h, s, n: (h[:, :0], s, n), ValueError, "L >= 1 and D >= 1"),
    (lambda h, s, n: (h[:, :, :0], s, n), ValueError, "L >= 1 and D >= 1"),
    (lambda h, s, n: (h, s[:2], n), ValueError, "start must have length"),
    (lambda h, s, n: (h, s, n[:2]), ValueError, "length must have length"),
    (lambda h, s, n: (h, torch.tensor([0, -1, 0]), torch.ones(3, dtype=torch.long)), ValueError, r"start\[1\]"),
    (lambda h, s, n: (h, torch.tensor([0, 6, 0]), torch.ones(3, dtype=torch.long)), ValueError, r"start\[1\]"),
    (lambda h, s, n: (h, torch.zeros(3, dtype=torch.long), torch.tensor([1, 0, 1])), ValueError, r"length\[1\]"),
    (lambda h, s, n: (h, torch.tensor([0, 0, 3]), torch.tensor([6, 6, 4])), ValueError, r"length\[2\]"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        span_mean_pool(*make(*_args()))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        span_mean_pool(*_args(), backend="numpy")


# ---------------------------------------------------------------- every backend vs the float64 reference


def _check(backend, device, hidden, start, length):
    """Output and gradient (random upstream grad) of `backend` vs the float64 torch backend."""
    h = hidden.detach().requires_grad_(True)  # a detached view keeps hidden's strides
    out = span_mean_pool(h, start, length, backend=backend)
    assert out.dtype == hidden.dtype and out.shape == (hidden.shape[0], hidden.shape[2])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=out.dtype)
    out.backward(grad)
    h64 = hidden.detach().double().requires_grad_(True)
    ref = span_mean_pool(h64, start, length, backend="torch")
    ref.backward(grad.double())
    assert_rel_close(out, ref, name="output")
    assert_rel_close(h.grad, h64.grad, name="grad hidden")
    # Outside the spans the gradient is exactly zero (also catches writes past the span).
    pos = torch.arange(hidden.shape[1], device=device)
    outside = (pos < start[:, None]) | (pos >= (start + length)[:, None])
    assert (h.grad[outside] == 0).all()


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B, L, D, span", [(1, 1, 1, None), (5, 11, 40, None), (3, 9, 16, 9)])
def test_matches_reference(backend, dtype, B, L, D, span, device, poison_empty):
    hidden, start, length = make_pool_inputs(B, L, D, dtype=dtype, device=device, span=span, requires_grad=False)
    _check(backend, device, hidden, start, length)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nan_outside", [False, True], ids=["finite", "nan-outside"])
def test_strided_hidden(backend, nan_outside, device, poison_empty):
    """A `[B, L, D]` view of a `[L, B, 2D]` buffer (no dim contiguous), int32 indices; with NaN outside the
    spans every backend must still give finite results (the kernels read only span positions; the torch
    reference zeroes the rest before its contraction, where 0 * NaN would be NaN)."""
    B, L, D = 4, 10, 24
    base = torch.randn(L, B, 2 * D, generator=torch.Generator().manual_seed(3)).to(device)
    hidden = base.transpose(0, 1)[:, :, ::2]
    start = torch.tensor([0, 3, 9, 2], dtype=torch.int32, device=device)
    length = torch.tensor([10, 4, 1, 7], dtype=torch.int32, device=device)
    assert not hidden.is_contiguous()
    if nan_outside:
        pos = torch.arange(L, device=device)
        hidden[(pos < start[:, None]) | (pos >= (start + length)[:, None])] = math.nan  # in place: keeps strides
        ref_hidden = hidden.nan_to_num(0.0)
        out = span_mean_pool(hidden, start, length, backend=backend)
        assert_rel_close(out, span_mean_pool(ref_hidden.double(), start, length, backend="torch"))
    else:
        _check(backend, device, hidden, start, length)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_upstream_grad(backend, device, poison_empty):
    """``out.sum().backward()`` hands the backward an expanded `[B, D]` gradient (all strides 0)."""
    hidden, start, length = make_pool_inputs(3, 7, 20, device=device)
    span_mean_pool(hidden, start, length, backend=backend).sum().backward()
    pos = torch.arange(7, device=device)
    in_span = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    expected = (in_span / length[:, None])[:, :, None].expand(3, 7, 20)
    assert_rel_close(hidden.grad, expected.double(), name="grad hidden")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_matches_reference_larger(backend, dtype, device, poison_empty):
    hidden, start, length = make_pool_inputs(37, 70, 200, dtype=dtype, device=device, requires_grad=False)
    _check(backend, device, hidden, start, length)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("span", [8, 16])
def test_realistic_size(backend, span, device, poison_empty, monkeypatch):
    """The LLM2Comp shape: B=512, L=512, memory-token spans of 8/16, D=4096, bf16; autotuned."""
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "1")
    hidden, start, length = make_pool_inputs(512, 512, 4096, dtype=torch.bfloat16, device=device, span=span,
                                             requires_grad=False)
    _check(backend, device, hidden, start, length)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_grad_same_output_and_no_graph(backend, device):
    """Under no_grad, or on inputs that need no grad, the backends call their forward without the autograd
    Function: the same values, and no graph."""
    hidden, start, length = make_pool_inputs(3, 11, 40, device=device)
    with_grad = span_mean_pool(hidden, start, length, backend=backend)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        no_grad = span_mean_pool(hidden, start, length, backend=backend)
    frozen = span_mean_pool(hidden.detach(), start, length, backend=backend)
    for out in (no_grad, frozen):
        assert out.grad_fn is None and torch.equal(out, with_grad.detach())
