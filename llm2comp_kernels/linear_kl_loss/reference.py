"""Row-chunked PyTorch implementation of `linear_kl_loss` (the torch backend).

Never holds the `N x V` logits: rows go through in chunks, and since the loss is always the
last op, each chunk's gradients are computed right away and backward only scales them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._autograd import GradsFromForward


@dataclass(frozen=True)
class KLOptions:
    temperature: float
    chunk_size: int
    needs_grad: bool


class _LinearKLTorchFn(GradsFromForward):
    @staticmethod
    def forward(ctx, student, teacher, weight, rows, opts: KLOptions):
        compute = torch.float64 if student.dtype == torch.float64 else torch.float32
        w = weight.to(compute)                                      # [V, H], cast once
        n = rows.numel()
        loss = torch.zeros((), dtype=compute, device=student.device)
        grad_student = torch.zeros_like(student, dtype=compute) if opts.needs_grad else None
        grad_weight = torch.zeros_like(w) if opts.needs_grad and weight.requires_grad else None
        for chunk in rows.split(opts.chunk_size):
            hs = student.index_select(0, chunk).to(compute)        # [C, H]
            ht = teacher.index_select(0, chunk).to(compute)
            log_ps = torch.log_softmax(hs @ w.T / opts.temperature, dim=-1)   # [C, V]
            log_pt = torch.log_softmax(ht @ w.T / opts.temperature, dim=-1)
            p_t = log_pt.exp()
            loss += (p_t * (log_pt - log_ps)).sum()
            if grad_student is None:
                continue
            # d KL / d logits_s = (p_s - p_t) / T, averaged over the n selected rows.
            g = (log_ps.exp() - p_t) / (opts.temperature * n)
            grad_student.index_copy_(0, chunk, g @ w)
            if grad_weight is not None:
                grad_weight += g.T @ hs
        if n > 0:
            loss = loss / n
        GradsFromForward.save_grads(ctx, student, weight, grad_student, grad_weight)
        return loss


def selected_rows(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """int64 indices of the rows that count (all rows when mask is None)."""
    if mask is None:
        return torch.arange(n, device=device)
    return mask.nonzero().flatten()


def linear_kl_loss_torch(student_hidden, teacher_hidden, weight, mask, temperature: float,
                         chunk_size: int) -> torch.Tensor:
    """Mean over selected rows of KL(softmax(teacher @ W.T / T) || softmax(student @ W.T / T))."""
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad)
    rows = selected_rows(mask, student_hidden.shape[0], student_hidden.device)
    opts = KLOptions(temperature, chunk_size, needs_grad)
    return _LinearKLTorchFn.apply(student_hidden, teacher_hidden.detach(), weight, rows, opts)
