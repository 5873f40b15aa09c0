"""Autograd plumbing shared by the ops' backends."""

from __future__ import annotations

import functools

import torch


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a call must go through its `autograd.Function`: grad mode is on and an input requires grad.
    Otherwise the backends call their forward directly: `Function.apply` alone costs about 13 us of host time per
    call (2-core CPU, torch 2.13), even under `torch.no_grad`, once per layer when `encode` runs a model."""
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
            b"llm2comp_kernels: this backend computes first derivatives only; use backend='torch' for a second "
            b"derivative (create_graph=True)", len(grads))
        return error(*[g.detach().requires_grad_() if g is not None else None for g in grads])
    return wrapped


class GradsFromForward(torch.autograd.Function):
    """Base for a loss that is always the last op, so its forward computes the gradients.

    forward(ctx, student, teacher, weight, rows, options) must end with
    ``ctx.save_for_backward(grad_student, grad_weight)`` (either may be None); backward only
    scales them by the incoming scalar gradient.
    """

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_loss):
        grad_student, grad_weight = ctx.saved_tensors
        if grad_student is not None:
            grad_student = grad_student * grad_loss
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_student, None, grad_weight, None, None
