"""Eager PyTorch oracle for `memory_attention`: explicit masked softmax, readable over fast."""

from __future__ import annotations

import math

import torch

from .checks import allowed_keys, zero_padding


def _masked_scores(q, k, seq_lens, causal, scale):
    """`[B, Hq, L, L]` scaled scores in float32 (float64 for float64 q), -inf where a key is padding or, if
    causal, in the future; and the `[B, L]` mask of real positions. Padded rows are zeroed first, so what they
    hold (NaN, inf) reaches no real row."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    valid, (qf, kf) = zero_padding(seq_lens, q.to(compute), k.to(compute))   # valid: [B, L]
    kf = kf.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    return scores.masked_fill(~allowed_keys(valid, causal), float("-inf")), valid


def memory_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                               causal: bool, scale: float, dropout_p: float = 0.0,
                               keep: torch.Tensor | None = None) -> torch.Tensor:
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]`, seq_lens `[B]` -> `[B, Hq, L, d]` in q's dtype.

    Computes in float32 (float64 for float64 inputs). Materialises the `[B, Hq, L, L]` scores:
    meant for tests and CPU, not for long sequences on GPU. With ``dropout_p > 0`` each attention
    probability is kept with probability ``1 - dropout_p`` and scaled by ``1 / (1 - dropout_p)``: the keep
    mask is bool `keep` `[B, Hq, L, L]` when given (to replay another backend's mask), else drawn from
    torch's default generator of q's device.
    """
    scores, valid = _masked_scores(q, k, seq_lens, causal, scale)
    _, (vf,) = zero_padding(seq_lens, v.to(scores.dtype))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        if keep is None:
            keep = torch.rand(probs.shape, device=probs.device) >= dropout_p
        probs = probs * keep / (1 - dropout_p)
    out = probs @ vf.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    # Padded query rows still see key 0, so no row is all -inf; zeroing them also zeroes their grads.
    return out.masked_fill(~valid[:, None, :, None], 0).to(q.dtype)


def memory_attention_lse_reference(q: torch.Tensor, k: torch.Tensor, seq_lens: torch.Tensor, causal: bool,
                                   scale: float) -> torch.Tensor:
    """`[B, Hq, L]` in float32 (float64 for float64 q): each row's log2 of the sum of exp(scores) over the keys it
    sees, 0 on padded rows; what the forward kernels save for the backward."""
    scores, valid = _masked_scores(q, k, seq_lens, causal, scale)
    return torch.logsumexp(scores, dim=-1) / math.log(2.0) * valid[:, None, :]
