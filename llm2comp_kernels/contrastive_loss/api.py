"""Public entry point of `contrastive_loss`."""

from __future__ import annotations

import torch

from .._backends import resolve_backend
from .checks import check_contrastive_loss

# "auto" on CUDA tensors: Triton first. In benchmarks/results/contrastive_loss_gpu.json the Triton kernels are
# 3.6-18x faster than the CUDA ones at every measured shape.
AUTO_ORDER = ("triton", "cuda")


def contrastive_loss(queries: torch.Tensor, docs: torch.Tensor, *, labels: torch.Tensor | None = None,
                     temperature: float = 0.05, normalize: bool = True, symmetric: bool = False,
                     reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """InfoNCE over in-batch and hard negatives.

    Args:
        queries: `[B, D]` float32/float16/bfloat16 (float64 on the torch backend).
        docs: `[N, D]`, same dtype and device. Every doc that is not a query's positive is one of
            its negatives.
        labels: int `[B]`, ``labels[i]`` is the row of docs holding query i's positive; default
            ``arange(B)`` (then ``N >= B``).
        temperature: > 0; logits are ``s_ij / temperature``.
        normalize: if True, ``s_ij`` is the cosine similarity, else the dot product.
        symmetric: also score each positive doc ``docs[labels[i]]`` against all queries (target
            query i) and average both directions per sample.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (`[B]`).
        backend: ``"auto"`` (triton > cuda for CUDA tensors, else torch), ``"torch"``, ``"triton"``
            or ``"cuda"``. No backend stores the `[B, N]` logits. The triton forward tiles them; the
            triton backward and both cuda passes go through the docs in chunks whose `[B, C]` blocks
            take about 128 MiB (C at least 256 docs), with the matrix products on cuBLAS; the torch
            backend goes through query chunks and recomputes each chunk in backward.

    Returns:
        The loss in fp32 (float64 for float64 inputs), not rounded to 16-bit inputs' dtype; gradients (in the
        inputs' dtypes) reach queries and docs.
    """
    labels = check_contrastive_loss(queries, docs, labels, temperature, normalize, symmetric, reduction)
    chosen = resolve_backend("contrastive_loss", backend, queries.device, queries.dtype, cuda_op="contrastive_loss_fwd",
                             auto_order=AUTO_ORDER)
    args = (queries, docs, labels, float(temperature), normalize, symmetric, reduction)
    if chosen == "triton":
        from .triton import contrastive_loss_triton
        return contrastive_loss_triton(*args)
    if chosen == "cuda":
        from .cuda import contrastive_loss_cuda
        return contrastive_loss_cuda(*args)
    from .chunked import contrastive_loss_torch
    return contrastive_loss_torch(*args)
