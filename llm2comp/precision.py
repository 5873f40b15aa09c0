"""The 16-bit dtype that autocast uses on a device: bf16 where the hardware has it, fp16 on GPUs older than
Ampere (T4, V100), whose bf16 is emulated in fp32 and slow."""

from __future__ import annotations

import torch

from llm2comp_kernels import MIN_CAPABILITY, compute_capability

__all__ = ["has_bf16", "half_dtype"]


def has_bf16(device: torch.device) -> bool:
    """True on CPUs and on CUDA GPUs with bf16 tensor cores (compute capability 8.0 or newer)."""
    return device.type != "cuda" or compute_capability(device) >= MIN_CAPABILITY


def half_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where `has_bf16`, else float16."""
    return torch.bfloat16 if has_bf16(device) else torch.float16
