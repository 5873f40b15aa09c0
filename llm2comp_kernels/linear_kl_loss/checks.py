"""Backend-free validation of `linear_kl_loss` arguments, and the row-chunk size rule."""

from __future__ import annotations

import torch

from .. import _validation as v

OP = "linear_kl_loss"
# Working fp32 buffers of `chunk x V` held at once per chunk (logits, probabilities, gradient).
_BUFFERS_PER_ROW = 6


def check_linear_kl_loss(student_hidden, teacher_hidden, weight, mask, temperature) -> torch.Tensor | None:
    """Validate the inputs; return the mask as bool `[N]` (None when all rows count)."""
    v.tensor(OP, "student_hidden", student_hidden, 2, shape_doc="[N, H]")
    v.tensor(OP, "teacher_hidden", teacher_hidden, 2, shape_doc="[N, H]")
    v.tensor(OP, "weight", weight, 2, shape_doc="[V, H]")
    v.same_dtype(OP, "student_hidden", student_hidden, teacher_hidden=teacher_hidden, weight=weight)
    v.same_device(OP, "student_hidden", student_hidden, teacher_hidden=teacher_hidden, weight=weight)
    N, H = student_hidden.shape
    v.non_empty(OP, "student_hidden", N, "number of rows")
    if H == 0 or weight.shape[0] == 0:
        raise ValueError(f"{OP}: H and V must be >= 1, got student_hidden {tuple(student_hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"{OP}: teacher_hidden must have the shape of student_hidden {tuple(student_hidden.shape)}, "
                         f"got {tuple(teacher_hidden.shape)}")
    v.size(OP, "weight", weight.shape[1], H, "hidden size (dim 1) equal to student_hidden's")
    v.positive_float(OP, "temperature", temperature)
    if mask is None:
        return None
    v.tensor(OP, "mask", mask, 1, dtypes=(torch.bool,), shape_doc="[N]")
    v.same_device(OP, "student_hidden", student_hidden, mask=mask)
    v.size(OP, "mask", mask.shape[0], N, "length (one entry per row)")
    return mask


def resolve_chunk_size(chunk_size, V: int, device: torch.device, op: str = OP) -> int:
    """The number of rows per chunk: `chunk_size` if given, else what fits the memory budget
    (`_validation.rows_per_chunk`) for the `chunk x V` fp32 working buffers."""
    if chunk_size is not None:
        return v.positive_int(op, "chunk_size", chunk_size)
    return v.rows_per_chunk(_BUFFERS_PER_ROW * 4 * V, device)
