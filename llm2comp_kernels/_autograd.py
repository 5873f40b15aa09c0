"""Autograd plumbing shared by the ops' backends."""

from __future__ import annotations

import torch


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a call must go through its `autograd.Function`: grad mode is on and an input requires grad.
    Otherwise the backends call their forward directly: `Function.apply` alone costs about 13 us of host time per
    call (2-core CPU, torch 2.13), even under `torch.no_grad`, once per layer when `encode` runs a model."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class GradsFromForward(torch.autograd.Function):
    """Base for a loss that is always the last op, so its forward computes the gradients.

    forward(ctx, student, teacher, weight, rows, options) must end with
    ``ctx.save_for_backward(grad_student, grad_weight)`` (either may be None); backward only
    scales them by the incoming scalar gradient.
    """

    @staticmethod
    def backward(ctx, grad_loss):
        grad_student, grad_weight = ctx.saved_tensors
        if grad_student is not None:
            grad_student = grad_student * grad_loss
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_student, None, grad_weight, None, None
