"""Triton backend of `linear_kl_loss`: cuBLAS GEMMs per row chunk, one fused softmax/KL/gradient kernel.

Per chunk of C selected rows: the student and teacher logits `[C, V]` come from one cuBLAS product of their
stacked hidden states `[2C, H]`, in fp32 (`mm_fp32`: rounding bf16 logits would swamp the small differences
between teacher and student that distillation lives on), so the LM head streams through once per chunk;
`_linear_kl_loss_kernel` (one program per row, looping over V) computes both log-sum-exps and the row's KL in
a first pass and overwrites the student logits with the logits gradient ``g = (p_s - p_t) / (T * n)`` in a
second; then, with g in the input dtype as a tensor-core operand, ``d_student = g @ W`` and
``dW += g.T @ h_s``. Since the loss is always the last op, these gradients are computed in forward and
backward only scales them. Extra memory is the `2C x V` fp32 logits and g's `C x V` copy, plus dW `[V, H]` in
the weight's dtype. float16 inputs differ: g leaves out the 1/n, which fp16 could not hold at n in the thousands,
and the products apply it in fp32 into fp32 gradients (`saved_grad_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._autograd import GradsFromForward, saved_grad_dtype
from .._matmul import mm_fp32

# Largest V block a program holds in registers per pass (two loads of this many fp32 lanes).
_MAX_BLOCK_V = 4096


@triton.jit
def _linear_kl_loss_kernel(
    s_ptr,          # [C, V] fp32 student logits; overwritten with the logits gradient if WRITE_GRAD
    t_ptr,          # [C, V] fp32 teacher logits
    kl_ptr,         # [C] fp32 per-row KL(p_t || p_s)
    V,
    stride_s,
    stride_t,
    inv_temp,       # 1 / T
    grad_scale,     # 1 / (T * n): the mean over the n selected rows and the chain rule through logits / T
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: online max / sum of exp for both distributions, and sum_v exp(zt - mt) * (zt - zs),
    # all rescaled whenever a running max grows. KL = A / St - lse_t + lse_s with z = logits / T.
    m_s = -float("inf")
    m_t = -float("inf")
    sum_s = 0.0
    sum_t = 0.0
    acc = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        valid = cols < V
        zs = tl.load(s_row + cols, mask=valid, other=0.0) * inv_temp
        zt = tl.load(t_row + cols, mask=valid, other=0.0) * inv_temp
        # -inf past V for the max and exp; zt - zs stays finite there (0) so 0 * (zt - zs) is no nan.
        zs_inf = tl.where(valid, zs, -float("inf"))
        zt_inf = tl.where(valid, zt, -float("inf"))
        new_s = tl.maximum(m_s, tl.max(zs_inf, axis=0))
        new_t = tl.maximum(m_t, tl.max(zt_inf, axis=0))
        sum_s = sum_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(zs_inf - new_s), axis=0)
        e_t = tl.exp(zt_inf - new_t)
        scale_t = tl.exp(m_t - new_t)
        sum_t = sum_t * scale_t + tl.sum(e_t, axis=0)
        acc = acc * scale_t + tl.sum(e_t * (zt - zs), axis=0)
        m_s = new_s
        m_t = new_t
    lse_s = m_s + tl.log(sum_s)
    lse_t = m_t + tl.log(sum_t)
    tl.store(kl_ptr + row, acc / sum_t - lse_t + lse_s)

    if WRITE_GRAD:
        # Pass 2: each element is read before it is overwritten by the same lane, so in place is safe.
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            valid = cols < V
            zs = tl.load(s_row + cols, mask=valid, other=0.0) * inv_temp
            zt = tl.load(t_row + cols, mask=valid, other=0.0) * inv_temp
            g = (tl.exp(zs - lse_s) - tl.exp(zt - lse_t)) * grad_scale
            tl.store(s_row + cols, g, mask=valid)


def _kl_rows(logits_s: torch.Tensor, logits_t: torch.Tensor, kl: torch.Tensor, temperature: float,
             grad_scale: float, write_grad: bool) -> None:
    """Launch the kernel on one chunk: `kl[C]` gets each row's KL; `logits_s` the gradient if `write_grad`."""
    C, V = logits_s.shape
    assert logits_s.dtype == logits_t.dtype == torch.float32
    assert logits_s.stride(1) == 1 and logits_t.stride(1) == 1 and kl.is_contiguous()
    block_v = min(triton.next_power_of_2(V), _MAX_BLOCK_V)
    _linear_kl_loss_kernel[(C,)](
        logits_s, logits_t, kl, V, logits_s.stride(0), logits_t.stride(0), 1.0 / temperature, grad_scale,
        BLOCK_V=block_v, WRITE_GRAD=write_grad, num_warps=8 if block_v >= 2048 else 4,
    )


@dataclass(frozen=True)
class _KLParams:
    temperature: float
    chunk_size: int
    needs_grad: bool


class _LinearKLTritonFn(GradsFromForward):
    @staticmethod
    def forward(ctx, student, teacher, weight, rows, params: _KLParams):
        n = rows.numel()
        kl = torch.zeros(n, dtype=torch.float32, device=student.device)
        grad_student = torch.zeros_like(student, dtype=saved_grad_dtype(student.dtype)) if params.needs_grad else None
        # In the weight's dtype, accumulated in place by each chunk's product (fp32 inside the product, one
        # rounding per chunk), as autograd does for an eager LM head in that dtype: an fp32 buffer would double
        # dW's memory (2 GiB more at V=128k, H=4096) and its traffic per chunk, plus a [V, H] temporary per chunk
        # and a cast at the end. float16 is the exception (see below).
        grad_weight = (torch.zeros_like(weight, dtype=saved_grad_dtype(weight.dtype))
                       if params.needs_grad and weight.requires_grad else None)
        # float16 cannot hold g = (p_s - p_t) / (T n): at n in the thousands most of it is below its smallest
        # normal (6e-5) or flushes to zero. For float16 the kernel leaves 1/n out and the fp32 products apply it.
        fp16 = weight.dtype == torch.float16
        inv_n = 1.0 / max(n, 1)
        grad_scale = 1.0 / params.temperature * (1.0 if fp16 else inv_n)
        w_t = weight.T
        for start in range(0, n, params.chunk_size):
            chunk = rows[start:start + params.chunk_size]
            C = chunk.numel()
            # Student and teacher rows in one product, so W streams through once per chunk instead of twice.
            both = torch.cat((student.index_select(0, chunk), teacher.index_select(0, chunk)))  # [2C, H]
            logits = mm_fp32(both, w_t)                               # [2C, V] fp32
            logits_s, hs = logits[:C], both[:C]
            _kl_rows(logits_s, logits[C:], kl[start:start + C], params.temperature, grad_scale,
                     grad_student is not None)
            if grad_student is None:
                continue
            g = logits_s.to(weight.dtype)                             # now d loss / d logits_s (x n for fp16)
            if fp16:
                grad_student.index_copy_(0, chunk, mm_fp32(g, weight, alpha=inv_n))
                if grad_weight is not None:
                    grad_weight.add_(mm_fp32(g.T, hs), alpha=inv_n)
                continue
            grad_student.index_copy_(0, chunk, g @ weight)
            if grad_weight is not None:
                grad_weight.addmm_(g.T, hs)
        loss = kl.sum() / n if n > 0 else kl.sum()
        GradsFromForward.save_grads(ctx, student, weight, grad_student, grad_weight)
        return loss


def linear_kl_loss_triton(student_hidden, teacher_hidden, weight, mask, temperature: float,
                          chunk_size: int) -> torch.Tensor:
    """Mean over selected rows of KL(softmax(teacher @ W.T / T) || softmax(student @ W.T / T)).

    student_hidden/teacher_hidden `[N, H]`, weight `[V, H]` in float32/float16/bfloat16 on one device;
    mask bool `[N]` or None; returns an fp32 scalar (0 when the mask selects nothing).
    """
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad)
    N = student_hidden.shape[0]
    # One nonzero() for the whole call; chunks then slice it without further host syncs.
    rows = torch.arange(N, device=student_hidden.device) if mask is None else mask.nonzero().flatten()
    params = _KLParams(temperature, chunk_size, needs_grad)
    return _LinearKLTritonFn.apply(student_hidden, teacher_hidden.detach(), weight, rows, params)
