"""Public entry point of `linear_kl_loss`."""

from __future__ import annotations

import torch

from .._autocast import autocast_inputs
from .._backends import resolve_backend
from .checks import check_linear_kl_loss, resolve_chunk_size


def linear_kl_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor, *,
                   mask: torch.Tensor | None = None, temperature: float = 1.0, chunk_size: int | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions through a shared LM head.

    Args:
        student_hidden: `[N, H]` float32/float16/bfloat16 (float64 on the torch backend).
        teacher_hidden: `[N, H]`, same dtype; a constant target (never receives gradient).
        weight: `[V, H]`, the LM head; receives the student path's gradient when it requires grad.
        mask: bool `[N]` selecting the rows that count, or None for all.
        temperature: > 0; both distributions are ``softmax(hidden @ weight.T / temperature)``.
        chunk_size: rows per chunk (default: sized to V and the free memory). Every backend works
            chunk by chunk and never holds the `N x V` logits.
        backend: ``"auto"`` (triton for CUDA tensors, else torch), ``"torch"`` or ``"triton"``.

    Returns:
        fp32 scalar (float64 for float64 inputs), not rounded to 16-bit inputs' dtype: the mean over the
        selected rows of ``sum_v p_t (log p_t - log p_s)``; 0 with zero gradients when the mask selects no
        row. Gradients (in the inputs' dtypes) are computed during forward (kept in fp32 for float16 inputs
        until backward multiplies them by the incoming gradient: fp16 training's loss scale comes with it).
        Under `torch.autocast`, as `F.linear`: the three tensors in the autocast dtype.
    """
    cast = autocast_inputs(student_hidden, teacher_hidden, weight)
    if cast is not None:
        with torch.autocast(student_hidden.device.type, enabled=False):
            return linear_kl_loss(*cast, mask=mask, temperature=temperature, chunk_size=chunk_size, backend=backend)
    mask = check_linear_kl_loss(student_hidden, teacher_hidden, weight, mask, temperature)
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], weight.device)
    chosen = resolve_backend("linear_kl_loss", backend, weight.device, weight.dtype, allowed=("torch", "triton"))
    args = (student_hidden, teacher_hidden, weight, mask, float(temperature), chunk_size)
    if chosen == "triton":
        from .triton import linear_kl_loss_triton
        return linear_kl_loss_triton(*args)
    from .reference import linear_kl_loss_torch
    return linear_kl_loss_torch(*args)
