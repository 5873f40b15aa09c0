"""`sdpa` backend: torch's `scaled_dot_product_attention` with a key-padding mask.

Plain PyTorch, so it runs wherever torch does, with torch's fused kernels (memory-efficient on CUDA GPUs, flash
on the CPU) and their autograd. What the kernel backends do not run is its home: CPU tensors and GPUs older than
Ampere, where ``"auto"`` picks it. Padded rows are computed and then zeroed, so the cost is that of the padded
batch. On CUDA, grouped k/v heads are repeated for SDPA: its memory-efficient kernel takes no grouped heads with
a mask (``enable_gqa`` would send it to the math kernel and its `[B, H, L, L]` scores); the CPU flash kernel
takes them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import allowed_keys, padding_mask


def memory_attention_sdpa(q, k, v, seq_lens, causal: bool, scale: float) -> torch.Tensor:
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]` -> `[B, Hq, L, d]` in q's dtype, padded rows zero (and their
    gradients; padded keys are masked out)."""
    L, group = q.shape[2], q.shape[1] // k.shape[1]
    valid = padding_mask(seq_lens, L)                                        # [B, L]
    padded = ~valid[:, None, :, None]
    # padding zeroed first: a NaN or inf there (fp16 overflow in a padded row's MLP) would reach the real rows
    # through the masked products (0 x inf) or, from padded queries, the real keys' gradient
    q, k, v = (x.masked_fill(padded, 0) for x in (q, k, v))
    if q.is_cuda and group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_keys(valid, causal), scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    # a padded query row sees the real keys (never an all-masked row); its output and gradient are dropped here
    return out.masked_fill(padded, 0)
