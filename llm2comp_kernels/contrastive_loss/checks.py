"""Backend-free validation of `contrastive_loss` arguments."""

from __future__ import annotations

import torch

from .. import _validation as v

OP = "contrastive_loss"
REDUCTIONS = ("mean", "sum", "none")


def check_contrastive_loss(queries, docs, labels, temperature, normalize, symmetric, reduction) -> torch.Tensor:
    """Validate the inputs and return the labels (``arange(B)`` when None) as int64."""
    v.tensor(OP, "queries", queries, 2, shape_doc="[B, D]")
    v.tensor(OP, "docs", docs, 2, shape_doc="[N, D]")
    v.same_dtype(OP, "queries", queries, docs=docs)
    v.same_device(OP, "queries", queries, docs=docs)
    B, D = queries.shape
    N = docs.shape[0]
    v.non_empty(OP, "queries", B)
    v.non_empty(OP, "docs", N, "number of docs")
    if D == 0:
        raise ValueError(f"{OP}: queries must have D >= 1, got shape {tuple(queries.shape)}")
    v.size(OP, "docs", docs.shape[1], D, "hidden size (dim 1) equal to queries'")
    v.positive_float(OP, "temperature", temperature)
    v.flag(OP, "normalize", normalize)
    v.flag(OP, "symmetric", symmetric)
    v.choice(OP, "reduction", reduction, REDUCTIONS)
    if labels is None:
        if N < B:
            raise ValueError(f"{OP}: without labels doc i is query i's positive, so docs needs at least "
                             f"B = {B} rows, got N = {N}")
        return torch.arange(B, device=queries.device)
    v.tensor(OP, "labels", labels, 1, dtypes=v.INT_DTYPES, shape_doc="[B]")
    v.same_device(OP, "queries", queries, labels=labels)
    v.size(OP, "labels", labels.shape[0], B, "length (one label per query)")
    v.in_range(OP, "labels", labels, 0, N - 1, f"0 <= labels[i] < N = {N}")
    return labels.long()
