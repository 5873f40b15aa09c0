"""Pooling: which final hidden states of a `TokenBatch` row make its embedding.

A row is ``[BOS] instruction text <mem_0..M-1> <pad>...`` (`llm2comp.tokenization`). Each pooling is the mean of
one span of the row:

| pooling | span | an empty text |
| memory | the M memory tokens, ``memory_start .. seq_lens-1`` | embedded |
| mean | the text tokens, ``text_start .. memory_start-1`` (no BOS, no instruction) | refused |
| last | the last text token, ``memory_start-1`` | refused |

The names and checks import without torch (the command line's parser offers them); the span functions take
tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .tokenization import TokenBatch

__all__ = ["POOLINGS", "check_pooling", "check_poolable", "memory_states", "pool", "pooled_span"]

POOLINGS = ("memory", "mean", "last")


def check_pooling(pooling: str) -> str:
    """`pooling` if it is one of `POOLINGS`, else ValueError."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def check_poolable(texts: Sequence[str], pooling: str, name: str = "sentences") -> None:
    """ValueError naming ``name[i]`` for an empty or whitespace-only text under a pooling over text tokens."""
    if pooling == "memory":
        return
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"{name}[{i}] is empty or whitespace only; {pooling!r} pooling has no text tokens "
                             "to pool (memory pooling embeds it)")


def pooled_span(batch: TokenBatch, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length), int64 `[B]` each: the positions `pooling` averages in each row of `batch`."""
    if pooling == "memory":
        return batch.memory_start, batch.seq_lens - batch.memory_start
    if pooling == "mean":
        return batch.text_start, batch.memory_start - batch.text_start
    if pooling == "last":
        return batch.memory_start - 1, batch.memory_start.new_ones(batch.memory_start.shape)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def pool(hidden: torch.Tensor, batch: TokenBatch, pooling: str) -> torch.Tensor:
    """Embeddings `[B, D]` (`hidden`'s dtype, fp32 accumulation) of final hidden states `hidden` `[B, L, D]`."""
    from llm2comp_kernels import span_mean_pool  # here: the names above import without torch

    start, length = pooled_span(batch, pooling)
    return span_mean_pool(hidden, start, length)


def memory_states(hidden: torch.Tensor, batch: TokenBatch, num_memory_tokens: int) -> torch.Tensor:
    """The memory tokens' final hidden states `[B, M, D]`, each row's in order, from `hidden` `[B, L, D]`."""
    offsets = batch.memory_start.new_tensor(range(num_memory_tokens))
    positions = batch.memory_start[:, None] + offsets  # [B, M]
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
