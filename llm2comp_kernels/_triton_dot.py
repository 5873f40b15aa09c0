"""The tensor-core product every Triton kernel here uses, and when it must multiply fp32 copies instead."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backends import triton_interpret


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """fp32-accumulated ``a @ b``. float32 operands use IEEE fp32 products (as torch does by default; TF32
    would cost ~1e-3 relative error). UPCAST (see `dot_upcast`) multiplies fp32 copies, since the triton 3.9
    interpreter computes bfloat16 dots wrongly; products of bf16 values are exact in fp32, so this matches the
    tensor-core result up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


def dot_upcast(dtype: torch.dtype) -> bool:
    """The UPCAST flag of `dot` for operands of `dtype`: on the CPU interpreter with bfloat16 only."""
    return triton_interpret() and dtype == torch.bfloat16
