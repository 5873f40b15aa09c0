"""Autograd plumbing shared by ops whose forward already computes the input gradients."""

from __future__ import annotations

import torch


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
