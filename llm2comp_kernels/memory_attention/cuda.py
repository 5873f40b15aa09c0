"""CUDA C++ backend of `memory_attention`: the tensor-core forward kernel, its fake kernel and autograd.

The forward kernel (``csrc/memory_attention``) takes q/k/v with any batch/head/sequence strides as
long as the head dim has unit stride and the strides are multiples of 8 elements (16 bytes), so the
transposes of `[B, L, H, d]` projections go in without a copy; other layouts are copied first.
It keeps no log-sum-exp: the backward recomputes the forward through the Triton backend
(``memory_attention(..., backend="triton")`` under autograd), which costs one extra forward pass but
reuses the Triton backward kernels.
"""

from __future__ import annotations

import torch

from .._autograd import needs_autograd
from .._backends import cuda_extension

cuda_extension()  # importing llm2comp_kernels._C registers torch.ops.llm2comp.*


@torch.library.register_fake("llm2comp::memory_attention_fwd")
def _memory_attention_fwd_fake(q, k, v, seq_lens, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _aligned(x: torch.Tensor) -> bool:
    """Whether x's first element is 16-byte aligned. Under torch.compile (fake tensors have no pointer) only
    the view's offset is checked: torch's allocator aligns storages, storages from DLPack may not be."""
    if torch.compiler.is_compiling():
        return x.storage_offset() % 8 == 0
    return x.data_ptr() % 16 == 0


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernel can read it in place, else a contiguous copy (freshly allocated, so aligned)."""
    if x.stride(-1) == 1 and _aligned(x) and all(s % 8 == 0 for s in x.stride()[:3]):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _forward(q, k, v, seq_lens, causal, scale):
    return torch.ops.llm2comp.memory_attention_fwd(_kernel_layout(q), _kernel_layout(k), _kernel_layout(v),
                                                   seq_lens.to(torch.int64).contiguous(), causal, scale)


class _MemoryAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_lens, causal, scale):
        ctx.save_for_backward(q, k, v, seq_lens)
        ctx.causal, ctx.scale = causal, scale
        return _forward(q, k, v, seq_lens, causal, scale)

    @staticmethod
    def backward(ctx, grad_out):
        from .api import memory_attention

        q, k, v, seq_lens = ctx.saved_tensors
        inputs = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            out = memory_attention(*inputs, seq_lens, causal=ctx.causal, scale=ctx.scale, backend="triton")
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if x.requires_grad else None for x in inputs), None, None, None)


def memory_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, causal: bool,
                          scale: float) -> torch.Tensor:
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]` float16/bfloat16 with d in {64, 128}, seq_lens int `[B]`
    -> `[B, Hq, L, d]` contiguous in q's dtype (padded rows are zeros)."""
    if not needs_autograd(q, k, v):
        return _forward(q, k, v, seq_lens, causal, float(scale))
    return _MemoryAttentionFn.apply(q, k, v, seq_lens, causal, float(scale))
