"""Eager PyTorch oracle for `memory_attention`: explicit masked softmax, readable over fast."""

from __future__ import annotations

import torch

from .checks import padding_mask


def memory_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                               causal: bool, scale: float) -> torch.Tensor:
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]`, seq_lens `[B]` -> `[B, Hq, L, d]` in q's dtype.

    Computes in float32 (float64 for float64 inputs). Materialises the `[B, Hq, L, L]` scores:
    meant for tests and CPU, not for long sequences on GPU.
    """
    B, Hq, L, d = q.shape
    group = Hq // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(group, dim=1)
    vf = v.to(compute).repeat_interleave(group, dim=1)
    valid = padding_mask(seq_lens, L)                          # [B, L]
    allowed = valid[:, None, None, :].expand(B, 1, L, L)       # key j is real
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    # Padded query rows still see key 0, so no row is all -inf; zeroing them also zeroes their grads.
    out = out * valid[:, None, :, None]
    return out.to(q.dtype)
