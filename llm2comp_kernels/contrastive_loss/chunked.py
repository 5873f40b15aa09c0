"""Memory-bounded PyTorch implementation of `contrastive_loss` (the torch backend).

Queries go through in row chunks; each chunk's `[C, N]` logits live only inside a checkpointed
function, so forward keeps nothing of size `B x N` and backward recomputes one chunk at a time.
Extra memory is O(C x N) with C sized to the working-memory budget, plus the normalised copies of
the inputs. The oracle stays `reference.contrastive_loss_reference` (one dense matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .._validation import rows_per_chunk
from .reference import reduce_losses

# fp32 `[C, N]` buffers alive at once in a chunk's backward (logits, softmax, its gradient).
_BUFFERS_PER_ROW = 3


def _row_losses(rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """`[C]` cross-entropy of ``rows @ cols.T / temperature`` against column `targets`, in the rows' dtype even
    under `torch.autocast` (which would compute the product in bf16, as the kernel backends never do)."""
    with torch.autocast(rows.device.type, enabled=False):
        return F.cross_entropy(rows @ cols.T / temperature, targets, reduction="none")


def _chunked_losses(rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor, temperature: float,
                    chunk_rows: int) -> torch.Tensor:
    parts = [checkpoint(_row_losses, r, cols, t, temperature, use_reentrant=False)
             for r, t in zip(rows.split(chunk_rows), targets.split(chunk_rows))]
    return torch.cat(parts)


def contrastive_loss_torch(queries: torch.Tensor, docs: torch.Tensor, labels: torch.Tensor, temperature: float,
                           normalize: bool, symmetric: bool, reduction: str,
                           chunk_rows: int | None = None) -> torch.Tensor:
    """queries `[B, D]`, docs `[N, D]`, labels int64 `[B]` -> scalar (or `[B]` for reduction "none").

    fp32 compute (float64 for float64 inputs); `chunk_rows` (default: the memory budget) rows per chunk.
    """
    compute = torch.float64 if queries.dtype == torch.float64 else torch.float32
    q, d = queries.to(compute), docs.to(compute)
    if normalize:
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    width = max(d.shape[0], q.shape[0] if symmetric else 0)
    chunk_rows = chunk_rows or rows_per_chunk(_BUFFERS_PER_ROW * q.element_size() * width, q.device)
    per_query = _chunked_losses(q, d, labels, temperature, chunk_rows)
    if symmetric:
        # Row i: the positive doc of query i against every query, target query i.
        targets = torch.arange(labels.shape[0], device=labels.device)
        back = _chunked_losses(d.index_select(0, labels), q, targets, temperature, chunk_rows)
        per_query = 0.5 * (per_query + back)
    return reduce_losses(per_query, reduction)
