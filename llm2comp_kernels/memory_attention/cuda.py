"""CUDA C++ backend of `memory_attention`: the tensor-core forward kernel, its fake kernel and autograd.

The forward kernel (``csrc/memory_attention``) takes q/k/v with any batch/head/sequence strides as
long as the head dim has unit stride and the strides are multiples of 8 elements (16 bytes), so the
transposes of `[B, L, H, d]` projections go in without a copy; other layouts are copied first.
Under autograd it also writes each row's log-sum-exp (fp32 `[B, Hq, L]`, base 2, as the Triton forward
saves it), and the backward runs the Triton backward kernels on the output and those statistics: no second
forward pass.
"""

from __future__ import annotations

import torch

from .._autograd import first_derivative_only, needs_autograd
from .._backends import cuda_extension

cuda_extension()  # importing llm2comp_kernels._C registers torch.ops.llm2comp.*

# Warps per block of the forward kernel (64 queries); benchmarks/bench_attention.py also times 8 (128 queries,
# each K/V tile shared by twice the rows). Neither has been timed on a GPU yet.
BLOCK_WARPS = 4


@torch.library.register_fake("llm2comp::memory_attention_fwd")
def _memory_attention_fwd_fake(q, k, v, seq_lens, causal, scale, with_lse=False, block_warps=4):
    B, Hq, L, _ = q.shape
    lse = q.new_empty((B, Hq, L) if with_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


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


def _forward(q, k, v, seq_lens, causal, scale, with_lse, block_warps):
    """(out, lse): lse fp32 `[B, Hq, L]` if with_lse, else an empty tensor."""
    return torch.ops.llm2comp.memory_attention_fwd(_kernel_layout(q), _kernel_layout(k), _kernel_layout(v),
                                                   seq_lens.to(torch.int64).contiguous(), causal, scale, with_lse,
                                                   block_warps)


class _MemoryAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_lens, causal, scale, block_warps):
        out, lse = _forward(q, k, v, seq_lens, causal, scale, True, block_warps)
        ctx.save_for_backward(q, k, v, seq_lens, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_out):
        from .triton import memory_attention_triton_backward  # imported here: triton is optional at import

        q, k, v, seq_lens, out, lse = ctx.saved_tensors
        grads = memory_attention_triton_backward(q, k, v, seq_lens, out, lse, grad_out, ctx.causal, ctx.scale)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])), None, None, None, None)


def memory_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, causal: bool,
                          scale: float, block_warps: int = BLOCK_WARPS) -> torch.Tensor:
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]` float16/bfloat16 with d in {64, 128}, seq_lens int `[B]`
    -> `[B, Hq, L, d]` contiguous in q's dtype (padded rows are zeros). `block_warps` (4 or 8): 16 query rows
    each, per block of the forward kernel."""
    if not needs_autograd(q, k, v):
        return _forward(q, k, v, seq_lens, causal, float(scale), False, block_warps)[0]
    return _MemoryAttentionFn.apply(q, k, v, seq_lens, causal, float(scale), block_warps)
