"""Public entry point of `span_mean_pool`."""

from __future__ import annotations

import torch

from .._backends import resolve_backend
from .checks import check_span_mean_pool

# "auto" on CUDA tensors: CUDA first. In benchmarks/results/span_mean_pool_gpu.json the CUDA kernels are 1.4-1.5x
# faster than the Triton ones, forward and forward+backward.
AUTO_ORDER = ("cuda", "triton")


def span_mean_pool(hidden: torch.Tensor, start: torch.Tensor, length: torch.Tensor, *,
                   backend: str = "auto") -> torch.Tensor:
    """Mean of a contiguous span of positions per row.

    Args:
        hidden: `[B, L, D]` float32/float16/bfloat16 (float64 on the torch backend).
        start, length: int32/int64 `[B]` with ``0 <= start[b]``, ``length[b] >= 1`` and
            ``start[b] + length[b] <= L``.
        backend: ``"auto"`` (cuda > triton for CUDA tensors, else torch), ``"torch"``,
            ``"triton"`` or ``"cuda"``.

    Returns:
        `[B, D]` in hidden's dtype: row b is ``hidden[b, start[b] : start[b] + length[b]].mean(0)``,
        accumulated in fp32. With start at the first memory token and length = number of memory
        tokens this is LLM2Comp pooling; with start 0 and length = text length, mean pooling.
    """
    check_span_mean_pool(hidden, start, length)
    chosen = resolve_backend("span_mean_pool", backend, hidden.device, hidden.dtype, cuda_op="span_mean_pool_fwd",
                             auto_order=AUTO_ORDER)
    if chosen == "triton":
        from .triton import span_mean_pool_triton
        return span_mean_pool_triton(hidden, start, length)
    if chosen == "cuda":
        from .cuda import span_mean_pool_cuda
        return span_mean_pool_cuda(hidden, start, length)
    from .reference import span_mean_pool_reference
    return span_mean_pool_reference(hidden, start, length)
