"""Eager PyTorch oracle for `contrastive_loss`: materialises the `[B, N]` similarity matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss_reference(queries: torch.Tensor, docs: torch.Tensor, labels: torch.Tensor, temperature: float,
                               normalize: bool, symmetric: bool, reduction: str) -> torch.Tensor:
    """queries `[B, D]`, docs `[N, D]`, labels int64 `[B]` -> scalar (or `[B]` for reduction "none").

    Computed in float32 (float64 for float64 inputs), and returned in that dtype.
    """
    compute = torch.float64 if queries.dtype == torch.float64 else torch.float32
    q, d = queries.to(compute), docs.to(compute)
    if normalize:
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    logits = q @ d.T / temperature                                     # [B, N]
    per_query = F.cross_entropy(logits, labels, reduction="none")      # [B]
    if symmetric:
        # Row i: positive doc labels[i] scored against every query, target query i.
        doc_to_query = logits[:, labels].T                              # [B, B]
        target = torch.arange(len(labels), device=labels.device)
        per_query = 0.5 * (per_query + F.cross_entropy(doc_to_query, target, reduction="none"))
    return reduce_losses(per_query, reduction)


def reduce_losses(per_query: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-query losses `[B]` (fp32, float64 for float64 inputs) -> their mean, their sum, or themselves
    (``"none"``), in that dtype: a loss is not rounded to its inputs' 16 bits. Every backend ends with it."""
    if reduction == "mean":
        return per_query.mean()
    if reduction == "sum":
        return per_query.sum()
    return per_query
