"""`sdpa` backend: torch's `scaled_dot_product_attention` with a key-padding mask.

Plain PyTorch, so it runs wherever torch does, with torch's fused kernels (memory-efficient on any CUDA GPU,
flash on the CPU) and their autograd. What the kernel backends do not run is its home: CPU tensors and GPUs
older than Ampere, where ``"auto"`` picks it. Padded rows are computed and then zeroed, so the cost is that of
the padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import padding_mask


def memory_attention_sdpa(q, k, v, seq_lens, causal: bool, scale: float) -> torch.Tensor:
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]` -> `[B, Hq, L, d]` in q's dtype, padded rows zero (and their
    gradients; padded keys are masked out)."""
    L = q.shape[2]
    valid = padding_mask(seq_lens, L)                                        # [B, L]
    allowed = valid[:, None, None, :]                                        # key j is real
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    # a padded query row sees the real keys (never an all-masked row); its output and gradient are dropped here
    return out.masked_fill(~valid[:, None, :, None], 0)
