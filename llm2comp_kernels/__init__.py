"""Fused kernels for LLM2Comp: memory attention, span pooling, contrastive and linear-KL losses.

Each op has a pure-PyTorch reference (the source of truth), a Triton backend and, for some, a
CUDA C++ backend in the optional extension `llm2comp_kernels._C`; ``backend="auto"`` picks the
fastest one that can run on the given tensors.
"""

from __future__ import annotations

import torch

from ._backends import available_for, cuda_extension
from .contrastive_loss import contrastive_loss
from .linear_kl_loss import linear_kl_loss
from .memory_attention import memory_attention
from .span_mean_pool import span_mean_pool

__all__ = ["memory_attention", "span_mean_pool", "contrastive_loss", "linear_kl_loss", "available_backends"]
__version__ = "0.1.0"

# op name -> (backends it has, the extension op behind its cuda backend)
_OP_BACKENDS = {
    "memory_attention": (("torch", "triton", "cuda", "flash"), "memory_attention_fwd"),
    "span_mean_pool": (("torch", "triton", "cuda"), "span_mean_pool_fwd"),
    "contrastive_loss": (("torch", "triton", "cuda"), "contrastive_loss_fwd"),
    "linear_kl_loss": (("torch", "triton"), None),
}


def available_backends(device: str | torch.device | None = None) -> dict[str, list[str]]:
    """For each op, the backends that can run on float32 tensors of `device` here.

    `device` defaults to ``"cuda"`` when a GPU is visible, else ``"cpu"``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda_extension()  # registers torch.ops.llm2comp.* when the extension was built
    return {op: available_for(device, cuda_op, backends) for op, (backends, cuda_op) in _OP_BACKENDS.items()}
