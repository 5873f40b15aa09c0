"""Fused kernels for LLM2Comp: memory attention, span pooling, contrastive and linear-KL losses.

Each op has a pure-PyTorch reference (the source of truth), a Triton backend and, for some, a
CUDA C++ backend in the optional extension `llm2comp_kernels._C`; ``backend="auto"`` picks the
fastest one that can run on the given tensors.
"""

from __future__ import annotations

import torch

from ._backends import MIN_CAPABILITY, available_for, compute_capability, cuda_extension
from .contrastive_loss import contrastive_loss
from .linear_kl_loss import linear_kl_loss
from .memory_attention import memory_attention
from .memory_attention.api import BACKENDS as MEMORY_ATTENTION_BACKENDS
from .memory_attention.api import LOW_PRECISION, LOW_PRECISION_BACKENDS
from .span_mean_pool import span_mean_pool

__all__ = ["memory_attention", "span_mean_pool", "contrastive_loss", "linear_kl_loss", "available_backends",
           "MEMORY_ATTENTION_BACKENDS", "MIN_CAPABILITY", "compute_capability"]
__version__ = "0.1.0"

# op name -> (backends it has, the extension op behind its cuda backend)
_OP_BACKENDS = {
    "memory_attention": (MEMORY_ATTENTION_BACKENDS, "memory_attention_fwd"),
    "span_mean_pool": (("torch", "triton", "cuda"), "span_mean_pool_fwd"),
    "contrastive_loss": (("torch", "triton", "cuda"), "contrastive_loss_fwd"),
    "linear_kl_loss": (("torch", "triton"), None),
}


def available_backends(device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.float32) -> dict[str, list[str]]:
    """For each op, the backends that can run on `dtype` tensors of `device` here (limits that depend on
    the inputs' shapes, such as head dims, aside).

    `device` defaults to ``"cuda"`` when a GPU is visible, else ``"cpu"``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"available_backends: not a device: {device!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("available_backends: no CUDA device is visible here")
    cuda_extension()  # registers torch.ops.llm2comp.* when the extension was built
    return {op: available_for(device, dtype, cuda_op, backends, _dtype_limits(op, dtype))
            for op, (backends, cuda_op) in _OP_BACKENDS.items()}


def _dtype_limits(op: str, dtype: torch.dtype) -> dict[str, str]:
    """The backends of `op` that cannot take `dtype` whatever the shapes, with the reason."""
    if op == "memory_attention" and dtype not in LOW_PRECISION:
        return {b: f"takes float16/bfloat16 only, got {dtype}" for b in LOW_PRECISION_BACKENDS}
    return {}
