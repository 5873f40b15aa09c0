"""Matrix products with fp32 results from float16/bfloat16/float32 operands, shared by the Triton backends."""

from __future__ import annotations

import functools

import torch

__all__ = ["mm_fp32"]

# torch.mm/addmm(out_dtype=float32) on float16/bfloat16 CUDA tensors (cuBLAS, fp32 output) exist from torch 2.8.
_MIXED_PRECISION_MM = torch.torch_version.TorchVersion(torch.__version__) >= (2, 8)


def mm_fp32(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha * a @ b (+ add_to)`` in fp32 from float16/bfloat16/float32 operands (exact products, fp32 sums):
    cuBLAS with an fp32 output on CUDA (torch >= 2.8), else fp32 copies of low-precision operands (the CPU
    interpreter: aten has no mixed-precision matmul there). float32 operands multiply as torch's matmul
    settings say: IEEE fp32 unless the user allowed TF32."""
    extra = {}
    if a.dtype != torch.float32:
        if a.is_cuda and _MIXED_PRECISION_MM:
            extra["out_dtype"] = torch.float32
        else:
            a, b = a.float(), b.float()
    if add_to is None:
        out = torch.mm(a, b, **extra)
        return out if alpha == 1.0 else out.mul_(alpha)
    if extra and not _addmm_takes_fp32_accumulator(a.device):
        return add_to.add_(torch.mm(a, b, **extra), alpha=alpha)
    return torch.addmm(add_to, a, b, alpha=alpha, **extra)


@functools.cache
def _addmm_takes_fp32_accumulator(device: torch.device) -> bool:
    """Whether ``torch.addmm(fp32, bf16, bf16, out_dtype=float32)`` runs here. The first releases with out_dtype
    (2.8, 2.9) required the added tensor in the operands' dtype; later ones accept it in the output's. Probed once
    on a 1 x 1 product rather than guessed from the version."""
    acc, x = torch.zeros(1, 1, device=device), torch.zeros(1, 1, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(acc, x, x, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True
