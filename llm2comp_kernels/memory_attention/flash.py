"""`flash` backend: FlashAttention-2's varlen kernel after unpadding (needs the flash-attn package)."""

from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func

from .checks import padding_mask


def memory_attention_flash(q, k, v, seq_lens, causal: bool, scale: float) -> torch.Tensor:
    """Unpad to `[total, H, d]`, run `flash_attn_varlen_func`, scatter back with zero padding rows."""
    B, Hq, L, d = q.shape
    valid = padding_mask(seq_lens, L)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu[1:] = seq_lens.cumsum(0)
    max_len = L  # an upper bound is enough for the kernel and avoids a host sync
    def unpad(x):
        return x.transpose(1, 2)[valid]
    out_unpadded = flash_attn_varlen_func(unpad(q), unpad(k), unpad(v), cu, cu, max_len, max_len,
                                          softmax_scale=scale, causal=causal)
    out = q.new_zeros(B, L, Hq, d)
    out[valid] = out_unpadded
    return out.transpose(1, 2)
