"""Backend-free validation of `memory_attention` arguments."""

from __future__ import annotations

import torch

from .. import _validation as v

OP = "memory_attention"


def check_memory_attention(q, k, v_, seq_lens, causal, scale, dropout_p=0.0) -> float:
    """Validate the inputs and return the softmax scale (``d ** -0.5`` when `scale` is None)."""
    v.tensor(OP, "q", q, 4, shape_doc="[B, Hq, L, d]")
    v.tensor(OP, "k", k, 4, shape_doc="[B, Hkv, L, d]")
    v.tensor(OP, "v", v_, 4, shape_doc="[B, Hkv, L, d]")
    v.tensor(OP, "seq_lens", seq_lens, 1, dtypes=v.INT_DTYPES, shape_doc="[B]")
    v.same_dtype(OP, "q", q, k=k, v=v_)
    v.same_device(OP, "q", q, k=k, v=v_, seq_lens=seq_lens)
    B, Hq, L, d = q.shape
    v.non_empty(OP, "q", B)
    if L == 0 or d == 0 or Hq == 0:
        raise ValueError(f"{OP}: q must have L, Hq and d >= 1, got shape {tuple(q.shape)}")
    if k.shape != v_.shape:
        raise ValueError(f"{OP}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v_.shape)}")
    v.size(OP, "k", k.shape[0], B, "batch size (dim 0)")
    v.size(OP, "k", k.shape[2], L, "sequence length (dim 2)")
    v.size(OP, "k", k.shape[3], d, "head dim (dim 3)")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{OP}: the number of query heads ({Hq}) must be a multiple of the number "
                         f"of key/value heads ({Hkv})")
    v.size(OP, "seq_lens", seq_lens.shape[0], B, "length (one entry per batch row)")
    v.in_range(OP, "seq_lens", seq_lens, 1, L, f"1 <= seq_lens[b] <= L = {L}")
    v.flag(OP, "causal", causal)
    v.probability(OP, "dropout_p", dropout_p)
    if scale is None:
        return d ** -0.5
    return v.positive_float(OP, "scale", scale)


def padding_mask(seq_lens: torch.Tensor, L: int) -> torch.Tensor:
    """Bool `[B, L]`: True at real (non-padding) positions."""
    return torch.arange(L, device=seq_lens.device) < seq_lens[:, None]


def zero_padding(seq_lens: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`padding_mask` and the `[B, H, L, d]` tensors with their padded rows zeroed: a NaN or inf there (fp16
    overflow in a padded row's MLP, say) would reach the real rows through masked products (0 x inf) or, from
    padded queries, the real keys' gradient."""
    valid = padding_mask(seq_lens, tensors[0].shape[2])
    # `where`: one pass over each tensor (an out-of-place masked_fill is a copy, then a fill)
    return valid, [torch.where(valid[:, None, :, None], t, 0) for t in tensors]


def allowed_keys(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """Bool `[B, 1, 1, L]` (`[B, 1, L, L]` if causal): True where query i may see key j, from `padding_mask`."""
    allowed = valid[:, None, None, :]                                      # key j is real
    if causal:
        L = valid.shape[1]
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    return allowed
