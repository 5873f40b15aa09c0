"""Contrastive losses of stages 2 and 3 on embeddings, and the cached-gradient (GradCache) backward.

`embed_and_backward` runs an embedding function over chunks of the inputs, computes a loss on
all embeddings together and back-propagates it into the model, either plainly (one graph for the
whole batch) or GradCache style, which holds one chunk's graph at a time: embed every chunk
without a graph, take the loss and its gradient with respect to the embeddings on the full
batch, then re-embed chunk by chunk with the graph and back-propagate that chunk's slice of the
embedding gradient. The random state is saved before each chunk's first pass and restored for
its second, so dropout draws the same masks and the gradients are those of the plain backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from llm2comp_kernels import contrastive_loss

from .distributed import digest64, gather_with_grad, rank_and_world

__all__ = ["in_batch_loss", "text_keys", "embed_and_backward"]


def in_batch_loss(queries: torch.Tensor, docs: torch.Tensor, temperature: float = 0.05,
                  doc_keys: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of each query against every rank's docs.

    Args:
        queries: `[B, D]` this rank's queries.
        docs: `[N, D]` this rank's docs, ``N >= B``; row i (i < B) is query i's positive, the
            other rows (hard negatives, other queries' positives) are negatives of every query.
            Docs are all-gathered with gradients, so query i of rank r has label ``r * N + i``.
        doc_keys: int64 `[N]` (`text_keys` of the docs' texts) or None. Over all ranks, a doc whose key an
            earlier doc has is left out and its queries point to that earlier one: a text repeated in the
            batch (two queries' positive, one row's positive and another's negative) is one column, never a
            negative of a query whose positive it is.

    Returns:
        Scalar mean over this rank's queries (fp32 accumulation in the kernel).
    """
    rank, _ = rank_and_world()
    all_docs = gather_with_grad(docs)
    labels = torch.arange(queries.shape[0], device=queries.device) + rank * docs.shape[0]
    if doc_keys is not None:
        all_docs, labels = _merge_repeated(all_docs, labels, gather_with_grad(doc_keys.to(docs.device)))
    return contrastive_loss(queries, all_docs, labels=labels, temperature=temperature)


def text_keys(texts: Sequence[str]) -> torch.Tensor:
    """int64 `[n]`: a 64-bit hash of each text, equal for equal texts (the same on every rank and run)."""
    return torch.tensor([digest64([t.encode("utf-8")]) for t in texts], dtype=torch.int64)


def _merge_repeated(docs: torch.Tensor, labels: torch.Tensor,
                    keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """docs `[N, D]` without the rows whose key an earlier row has, and `labels` pointing into what is left
    (a dropped row's label goes to the first row of its key)."""
    n = keys.shape[0]
    rows = torch.arange(n, device=keys.device)
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((unique.shape[0],), n, device=keys.device).scatter_reduce(0, inverse, rows, "amin")[inverse]
    kept = first == rows
    new_index = torch.cumsum(kept, 0) - 1
    return docs[kept], new_index[first[labels]]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def unscaled(loss: torch.Tensor) -> torch.Tensor:
    """The loss as it is (no loss scaling)."""
    return loss


def embed_and_backward(embed: Callable[[Any], torch.Tensor], chunks: Sequence[Any],
                       loss_fn: Callable[[torch.Tensor], torch.Tensor], *, cached: bool, device: torch.device,
                       scale: Callable[[torch.Tensor], torch.Tensor] = unscaled) -> torch.Tensor:
    """Embed `chunks`, compute ``loss_fn(cat(embeddings))`` and back-propagate it into the model.

    Args:
        embed: one chunk of inputs -> `[b_i, D]` embeddings (with dropout in train mode).
        chunks: the inputs, in the row order `loss_fn` expects.
        loss_fn: `[sum b_i, D]` -> scalar (already scaled for gradient accumulation).
        cached: GradCache (one chunk's graph alive at a time) instead of one graph for all.
        device: where the model runs (its RNG is saved and replayed per chunk when cached).
        scale: what is differentiated instead of the loss (fp16 loss scaling; the cached embedding gradients are
            scaled with it).

    Returns:
        The detached loss.
    """
    if not cached:
        loss = loss_fn(torch.cat([embed(chunk) for chunk in chunks]))
        scale(loss).backward()
        return loss.detach()
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(device))
            reps.append(embed(chunk))
    after = _rng_state(device)
    full = torch.cat(reps).detach().requires_grad_(True)
    loss = loss_fn(full)
    (grad,) = torch.autograd.grad(scale(loss), full)
    sizes = [r.shape[0] for r in reps]
    for chunk, state, chunk_grad in zip(chunks, states, grad.split(sizes)):
        _set_rng_state(state, device)
        embed(chunk).backward(chunk_grad)
    _set_rng_state(after, device)
    return loss.detach()
