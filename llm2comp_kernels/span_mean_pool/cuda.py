"""CUDA C++ backend of `span_mean_pool`: torch.ops.llm2comp bindings, fake kernels and autograd.

Kernels in ``csrc/span_mean_pool``: the forward reads only the span (16-byte loads along D, fp32
accumulation); the backward writes all of ``[B, L, D]`` in one pass (grad / length in the span, zeros
elsewhere), so no separate zero-fill runs.
"""

from __future__ import annotations

import torch

from .._autograd import first_derivative_only, needs_autograd
from .._backends import cuda_extension

cuda_extension()  # importing llm2comp_kernels._C registers torch.ops.llm2comp.*


@torch.library.register_fake("llm2comp::span_mean_pool_fwd")
def _span_mean_pool_fwd_fake(hidden, start, length):
    return hidden.new_empty(hidden.shape[0], hidden.shape[2])


@torch.library.register_fake("llm2comp::span_mean_pool_bwd")
def _span_mean_pool_bwd_fake(grad_out, start, length, L):
    return grad_out.new_empty(grad_out.shape[0], L, grad_out.shape[1])


class _SpanMeanPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, start, length):
        ctx.save_for_backward(start, length)
        ctx.L = hidden.shape[1]
        return torch.ops.llm2comp.span_mean_pool_fwd(hidden, start, length)

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_out):
        start, length = ctx.saved_tensors
        return torch.ops.llm2comp.span_mean_pool_bwd(grad_out.contiguous(), start, length, ctx.L), None, None


def span_mean_pool_cuda(hidden: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """hidden `[B, L, D]` (made contiguous), start/length int `[B]` -> `[B, D]` in hidden's dtype."""
    args = (hidden.contiguous(), start.to(torch.int64).contiguous(), length.to(torch.int64).contiguous())
    if not needs_autograd(hidden):
        return torch.ops.llm2comp.span_mean_pool_fwd(*args)
    return _SpanMeanPoolFn.apply(*args)
