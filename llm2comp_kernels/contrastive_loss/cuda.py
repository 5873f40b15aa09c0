"""CUDA C++ backend of `contrastive_loss`: torch.ops.llm2comp bindings, fake kernels and autograd.

The ops (``csrc/bindings.cpp``, kernels in ``csrc/contrastive_loss``) take the already normalised
embeddings: with ``normalize=True`` F.normalize runs once here in torch, in fp32, and autograd carries the
gradient through it. The backward op returns fp32 gradients, so that chain rule also runs in fp32: rounding
the gradient of the unit vectors to bf16 before projecting out their radial part would lose most digits.
Both ops go through the docs in chunks: cuBLAS computes a chunk's fp32 block of dot products and our kernels
fold it into online row (and, if symmetric, column) log-sum-exps (forward), or turn it into the block of
logit gradients dS that two more cuBLAS products take to dq and dd (backward). A chunk's blocks take about
128 MiB whatever B is; the `[B, N]` logits never exist. Only the mean/sum reduction is torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._autograd import first_derivative_only
from .._backends import cuda_extension
from .reference import reduce_losses

cuda_extension()  # importing llm2comp_kernels._C registers torch.ops.llm2comp.*


@torch.library.register_fake("llm2comp::contrastive_loss_fwd")
def _contrastive_loss_fwd_fake(queries, docs, labels, temperature, symmetric, doc_chunk=0):
    B, N = queries.shape[0], docs.shape[0]
    f32 = dict(dtype=torch.float32)
    # loss [B]; per-row and per-column (max, sum) softmax statistics [B, 2] and [N or 0, 2]
    return (queries.new_empty(B, **f32), queries.new_empty(B, 2, **f32),
            queries.new_empty(N if symmetric else 0, 2, **f32))


@torch.library.register_fake("llm2comp::contrastive_loss_bwd")
def _contrastive_loss_bwd_fake(grad_loss, queries, docs, labels, row_stats, col_stats, temperature, symmetric,
                               doc_chunk=0):
    return (torch.empty_like(queries, dtype=torch.float32, memory_format=torch.contiguous_format),
            torch.empty_like(docs, dtype=torch.float32, memory_format=torch.contiguous_format))


@dataclass(frozen=True)
class _Params:
    temperature: float
    symmetric: bool
    dtype: torch.dtype  # the dtype the kernels run in (the caller's inputs')
    doc_chunk: int      # docs per chunk, 0: the kernels' workspace budget


class _ContrastiveLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, docs, labels, params: _Params):
        # queries/docs may be fp32 (normalised) copies of lower-precision inputs and get fp32 gradients back.
        ctx.input_dtypes = (queries.dtype, docs.dtype)
        queries, docs = queries.to(params.dtype).contiguous(), docs.to(params.dtype).contiguous()
        loss, row_stats, col_stats = torch.ops.llm2comp.contrastive_loss_fwd(
            queries, docs, labels, params.temperature, params.symmetric, params.doc_chunk)
        ctx.save_for_backward(queries, docs, labels, row_stats, col_stats)
        ctx.params = params
        return loss

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_loss):
        queries, docs, labels, row_stats, col_stats = ctx.saved_tensors
        p = ctx.params
        dq, dd = torch.ops.llm2comp.contrastive_loss_bwd(grad_loss.float().contiguous(), queries, docs, labels,
                                                         row_stats, col_stats, p.temperature, p.symmetric, p.doc_chunk)
        return dq.to(ctx.input_dtypes[0]), dd.to(ctx.input_dtypes[1]), None, None


def contrastive_loss_cuda(queries: torch.Tensor, docs: torch.Tensor, labels: torch.Tensor, temperature: float,
                          normalize: bool, symmetric: bool, reduction: str, doc_chunk: int = 0) -> torch.Tensor:
    """queries `[B, D]`, docs `[N, D]`, labels int64 `[B]` -> fp32 scalar (`[B]` for "none").
    `doc_chunk`: docs per chunk (0: sized to the kernels' workspace budget)."""
    params = _Params(float(temperature), symmetric, queries.dtype, doc_chunk)
    if normalize:
        queries, docs = F.normalize(queries.float(), dim=-1), F.normalize(docs.float(), dim=-1)
    per_query = _ContrastiveLossFn.apply(queries, docs, labels.to(torch.int64).contiguous(), params)  # fp32 [B]
    return reduce_losses(per_query, reduction)
