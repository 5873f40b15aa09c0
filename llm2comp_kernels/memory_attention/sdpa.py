"""`sdpa` backend: torch's `scaled_dot_product_attention` with a key-padding mask.

Plain PyTorch, so it runs wherever torch does, with torch's fused kernels (memory-efficient on CUDA GPUs, flash
on the CPU) and their autograd. What the kernel backends do not run is its home: CPU tensors and GPUs older than
Ampere, where ``"auto"`` picks it. Padded rows are computed and then zeroed, so the cost is that of the padded
batch; on the CPU a batch without padding runs SDPA without mask or zeroing. On CUDA, grouped k/v heads are
repeated for SDPA: its memory-efficient kernel takes no grouped heads with a mask (``enable_gqa`` would send it to
the math kernel and its `[B, H, L, L]` scores); the CPU flash kernel takes them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._autograd import needs_autograd
from .checks import allowed_keys, zero_padding


def memory_attention_sdpa(q, k, v, seq_lens, causal: bool, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]` -> `[B, Hq, L, d]` in q's dtype, padded rows zero (and their
    gradients; padded keys are masked out). `dropout_p`: SDPA's own attention dropout (torch's generator)."""
    group = q.shape[1] // k.shape[1]
    if q.device.type == "cpu" and bool((seq_lens == q.shape[2]).all()):  # no padding (a host sync: CPU only)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p, is_causal=causal,
                                              enable_gqa=group > 1)
    if needs_autograd(q, k, v):  # padded queries zeroed for their gradient; their outputs are zeroed below
        valid, (q, k, v) = zero_padding(seq_lens, q, k, v)                   # valid: [B, L]
    else:
        valid, (k, v) = zero_padding(seq_lens, k, v)
    if q.is_cuda and group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_keys(valid, causal), scale=scale,
                                         dropout_p=dropout_p, enable_gqa=q.shape[1] != k.shape[1])
    # a padded query row sees the real keys (never an all-masked row); its output and gradient are dropped here
    padded = ~valid[:, None, :, None]
    # in place where autograd is off: one copy of the output less per layer in `encode`
    return out.masked_fill(padded, 0) if out.requires_grad else out.masked_fill_(padded, 0)
