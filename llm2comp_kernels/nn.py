"""`torch.nn.Module` wrappers of the ops: they hold the options, the functional ops do the work.

Each module checks its options when built (so a bad setting fails at model construction, not at
the first step), is picklable, prints its settings, and traces under ``torch.compile(fullgraph=True)``
on the torch backend. One exception: `LinearKLLoss` with a `mask` selects a data-dependent number
of rows, which Dynamo cannot trace in one graph; it runs correctly with one graph break.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _OP_BACKENDS
from . import _validation as v
from .contrastive_loss import contrastive_loss
from .contrastive_loss.checks import REDUCTIONS
from .linear_kl_loss import linear_kl_loss
from .linear_kl_loss.checks import resolve_chunk_size
from .memory_attention import memory_attention
from .span_mean_pool import span_mean_pool

__all__ = ["MemoryAttention", "SpanMeanPool", "ContrastiveLoss", "LinearKLLoss"]


def _backend(module: str, op: str, backend) -> str:
    return v.choice(module, "backend", backend, ("auto",) + _OP_BACKENDS[op][0])



class MemoryAttention(nn.Module):
    """`memory_attention` (bidirectional or causal attention over right-padded rows, GQA).

    ``forward(q [B, Hq, L, d], k [B, Hkv, L, d], v [B, Hkv, L, d], seq_lens [B]) -> [B, Hq, L, d]``.
    `dropout`: attention-probability dropout, in training mode only (as `torch.nn.MultiheadAttention`); its masks
    come from torch's default generator (see `memory_attention`'s ``dropout_p``).
    """

    def __init__(self, *, causal: bool = False, scale: float | None = None, dropout: float = 0.0,
                 backend: str = "auto") -> None:
        super().__init__()
        self.causal = v.flag("MemoryAttention", "causal", causal)
        self.scale = None if scale is None else v.positive_float("MemoryAttention", "scale", scale)
        self.dropout = v.probability("MemoryAttention", "dropout", dropout)
        self.backend = _backend("MemoryAttention", "memory_attention", backend)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        return memory_attention(q, k, v, seq_lens, causal=self.causal, scale=self.scale,
                                dropout_p=self.dropout if self.training else 0.0, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}, dropout={self.dropout}, backend={self.backend!r}"


class SpanMeanPool(nn.Module):
    """`span_mean_pool`: ``forward(hidden [B, L, D], start [B], length [B]) -> [B, D]``."""

    def __init__(self, *, backend: str = "auto") -> None:
        super().__init__()
        self.backend = _backend("SpanMeanPool", "span_mean_pool", backend)

    def forward(self, hidden: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return span_mean_pool(hidden, start, length, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class ContrastiveLoss(nn.Module):
    """`contrastive_loss` (InfoNCE over in-batch and hard negatives).

    ``forward(queries [B, D], docs [N, D], labels [B] | None) -> scalar`` (`[B]` for reduction "none");
    without labels doc i is query i's positive.
    """

    def __init__(self, *, temperature: float = 0.05, normalize: bool = True, symmetric: bool = False,
                 reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.temperature = v.positive_float("ContrastiveLoss", "temperature", temperature)
        self.normalize = v.flag("ContrastiveLoss", "normalize", normalize)
        self.symmetric = v.flag("ContrastiveLoss", "symmetric", symmetric)
        self.reduction = v.choice("ContrastiveLoss", "reduction", reduction, REDUCTIONS)
        self.backend = _backend("ContrastiveLoss", "contrastive_loss", backend)

    def forward(self, queries: torch.Tensor, docs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return contrastive_loss(queries, docs, labels=labels, temperature=self.temperature, normalize=self.normalize,
                                symmetric=self.symmetric, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, normalize={self.normalize}, symmetric={self.symmetric}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class LinearKLLoss(nn.Module):
    """`linear_kl_loss`: KL(teacher || student) through a shared LM head, never holding the logits.

    ``forward(student_hidden [N, H], teacher_hidden [N, H], weight [V, H], mask [N] | None) -> scalar``.
    The LM head is an input (not a parameter of this module) because it belongs to the model; it gets
    the student path's gradient only (the teacher distribution is a constant target).
    Gradients are computed during forward, so call it with grad enabled only when you backpropagate.
    """

    def __init__(self, *, temperature: float = 1.0, chunk_size: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = v.positive_float("LinearKLLoss", "temperature", temperature)
        if chunk_size is not None:
            # only validates: a given size comes back as is
            resolve_chunk_size(chunk_size, 1, torch.device("cpu"), "LinearKLLoss")
        self.chunk_size = chunk_size
        self.backend = _backend("LinearKLLoss", "linear_kl_loss", backend)

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return linear_kl_loss(student_hidden, teacher_hidden, weight, mask=mask, temperature=self.temperature,
                              chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, chunk_size={self.chunk_size}, backend={self.backend!r}"
