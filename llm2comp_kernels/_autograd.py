"""Autograd plumbing shared by the ops' backends."""

from __future__ import annotations

import functools

import torch


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a call must go through its `autograd.Function`: grad mode is on and an input requires grad.
    Otherwise the backends call their forward directly: `Function.apply` alone costs about 13 us of host time per
    call (on CPU, torch 2.13), even under `torch.no_grad`, once per layer when `encode` runs a model."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def first_derivative_only(backward):
    """Decorate the backward of an `autograd.Function` whose kernels give first derivatives only.

    Under ``create_graph=True`` its gradients come out attached to a node that raises if a second
    derivative goes through it (a gradient penalty, say), rather than silently missing this op's part.
    torch's ``once_differentiable`` does so only when the incoming gradient requires grad, which it
    does not when the op is the loss itself.
    """
    @functools.wraps(backward)
    def wrapped(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        # DelayedError (torch's own tool for this, as in once_differentiable) raises in its backward.
        error = torch._C._functions.DelayedError(
            b"llm2comp_kernels: this backend computes first derivatives only (create_graph=True needs a second): "
            b"backend='torch' of memory_attention, span_mean_pool and contrastive_loss gives one; linear_kl_loss "
            b"has none (its gradients come from its forward)", len(grads))
        return error(*[g.detach().requires_grad_() if g is not None else None for g in grads])
    return wrapped


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient computed in forward is kept in until backward scales it: the input's, but fp32 for
    float16, whose range cannot hold a mean over thousands of rows (most of it would flush to zero) before fp16
    training's loss scale, which arrives with the incoming gradient, multiplies it."""
    return torch.float32 if dtype == torch.float16 else dtype


class GradsFromForward(torch.autograd.Function):
    """Base for a loss that is always the last op, so its forward computes the gradients.

    forward(ctx, student, teacher, weight, rows, options) must end with ``save_grads(ctx, ...)``; backward only
    scales them by the incoming scalar gradient (fp16 training's loss scale among it) and casts them to the inputs'
    dtypes.
    """

    @staticmethod
    def save_grads(ctx, student: torch.Tensor, weight: torch.Tensor, grad_student: torch.Tensor | None,
                   grad_weight: torch.Tensor | None) -> None:
        """Keep the gradients of `student` and `weight` (either may be None), in `saved_grad_dtype` of theirs."""
        ctx.grad_dtypes = (student.dtype, weight.dtype)
        ctx.save_for_backward(*(g.to(saved_grad_dtype(x.dtype)) if g is not None else None
                                for g, x in ((grad_student, student), (grad_weight, weight))))

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_loss):
        grad_student, grad_weight = (g.mul(grad_loss).to(dtype) if g is not None else None
                                     for g, dtype in zip(ctx.saved_tensors, ctx.grad_dtypes))
        return grad_student, None, grad_weight, None, None
