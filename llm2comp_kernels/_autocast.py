"""`torch.autocast` for the ops that multiply matrices (`memory_attention`, `linear_kl_loss`).

Under autocast they behave as torch's own matrix ops (SDPA, `F.linear`): floating inputs are cast to the autocast
dtype and the op then runs with autocast off, so its kernels see one dtype and its fp32 softmax and accumulation
stay fp32. Without this a transformers layer under autocast hands the attention fp32 q and k (the rotary
embedding multiplies the bf16 projections by fp32 cos/sin) beside a bf16 v.
"""

from __future__ import annotations

import torch

_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone, as torch does


def _eligible(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in _ELIGIBLE


def autocast_inputs(*tensors) -> tuple | None:
    """`tensors` cast to the autocast dtype of the first one's device when autocast is on there (anything not an
    eligible floating tensor passes unchanged, for the op's own checks to reject), else None: run as given."""
    first = tensors[0]
    if not _eligible(first) or not torch.is_autocast_enabled(first.device.type):
        return None
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if _eligible(t) else t for t in tensors)
