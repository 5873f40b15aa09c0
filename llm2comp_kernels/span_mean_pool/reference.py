"""Eager PyTorch oracle for `span_mean_pool`."""

from __future__ import annotations

import torch


def span_mean_pool_reference(hidden: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """hidden `[B, L, D]`, start/length `[B]` -> `[B, D]` in hidden's dtype (fp32/fp64 accumulate).

    Builds the `[B, L]` averaging weights (1/length inside the span, 0 outside) and contracts, positions outside
    the span zeroed first (0 x NaN would be NaN).
    """
    L = hidden.shape[1]
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    pos = torch.arange(L, device=hidden.device)
    in_span = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    weights = in_span.to(compute) / length[:, None].to(compute)
    with torch.autocast(hidden.device.type, enabled=False):  # a mean in `compute`, not autocast's 16-bit product
        inside = hidden.to(compute).masked_fill(~in_span[..., None], 0)
        return torch.einsum("bl,bld->bd", weights, inside).to(hidden.dtype)
