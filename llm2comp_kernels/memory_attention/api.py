"""Public entry point of `memory_attention`."""

from __future__ import annotations

import torch

from .._autocast import autocast_inputs
from .._autograd import needs_autograd
from .._backends import resolve_backend, triton_import_error
from .checks import check_memory_attention

# "auto" on CUDA tensors: Triton first, except for a forward without gradient (what `encode` runs) at
# L <= SHORT_FORWARD_MAX_L, where the CUDA forward comes first. In benchmarks/results/attention_gpu.json the Triton
# forward is 2.2-2.8x faster than the CUDA one from L=512 on; at L=128 the CUDA one wins, 0.090 against 0.214 ms
# per call, where the Triton call is bound by its host-side launch (0.23 ms of host time against the CUDA op's
# 0.11).
AUTO_ORDER = ("triton", "cuda")
SHORT_FORWARD_ORDER = ("cuda", "triton")
SHORT_FORWARD_MAX_L = 128

BACKENDS = ("torch", "sdpa", "triton", "cuda", "flash")
CUDA_HEAD_DIMS = (64, 128)
TRITON_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256)
TRITON_MAX_BATCH = 65535  # CUDA's limit on grid axes 1 and 2 (the kernels' head and batch-row axes)
FLASH_MAX_HEAD_DIM = 256
LOW_PRECISION = (torch.float16, torch.bfloat16)
LOW_PRECISION_BACKENDS = ("cuda", "flash")  # the backends that take float16/bfloat16 only
# Refuse dropout_p > 0; "auto" routes around them (on CUDA tensors to triton, whose kernels draw the masks).
NO_DROPOUT_BACKENDS = ("cuda", "flash")


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> dict[str, str]:
    """Why a kernel backend cannot take these inputs, per backend (those it can take are absent)."""
    B, _, _, d = q.shape
    reasons = {}
    if d not in TRITON_HEAD_DIMS:
        reasons["triton"] = f"the Triton kernels support head dims {TRITON_HEAD_DIMS}, got {d}"
    elif B > TRITON_MAX_BATCH:
        reasons["triton"] = f"the Triton kernels take at most {TRITON_MAX_BATCH} batch rows (a grid axis), got {B}"
    if d not in CUDA_HEAD_DIMS or q.dtype not in LOW_PRECISION:
        reasons["cuda"] = (f"the CUDA kernel supports float16/bfloat16 with head dims {CUDA_HEAD_DIMS}, "
                           f"got {q.dtype} with d={d}")
    elif needs_autograd(q, k, v) and (err := triton_import_error()) is not None:
        reasons["cuda"] = f"its backward runs the Triton kernels, and {err}"
    if q.dtype not in LOW_PRECISION or d > FLASH_MAX_HEAD_DIM:
        reasons["flash"] = (f"flash_attn supports float16/bfloat16 with head dims up to {FLASH_MAX_HEAD_DIM}, "
                            f"got {q.dtype} with d={d}")
    if dropout_p > 0:
        for backend in NO_DROPOUT_BACKENDS:
            reasons.setdefault(backend, f"it has no attention dropout (got dropout_p={dropout_p})")
    return reasons


def auto_order(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, ...]:
    """The order "auto" tries the kernel backends in for these inputs (see `AUTO_ORDER`)."""
    if q.shape[2] <= SHORT_FORWARD_MAX_L and not needs_autograd(q, k, v):
        return SHORT_FORWARD_ORDER
    return AUTO_ORDER


def memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, *,
                     causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                     backend: str = "auto") -> torch.Tensor:
    """Attention over right-padded sequences, bidirectional by default, with grouped-query heads.

    Args:
        q: `[B, Hq, L, d]` float32/float16/bfloat16 (float64 on the torch and sdpa backends).
        k, v: `[B, Hkv, L, d]`, same dtype and device, `Hq % Hkv == 0`. Query head h reads
            key/value head ``h // (Hq // Hkv)``; k/v are never repeated in memory by the kernels.
        seq_lens: int32/int64 `[B]`, ``1 <= seq_lens[b] <= L``: row b holds real tokens at
            positions ``0 .. seq_lens[b]-1`` and padding after them.
        causal: if True, query i also sees only keys ``j <= i``.
        scale: softmax scale, default ``d ** -0.5``.
        dropout_p: attention-probability dropout in [0, 1): each probability is zeroed with probability
            `dropout_p` and the kept ones scaled by ``1 / (1 - dropout_p)``; masks are drawn from torch's
            default generator of the device, so restoring its state replays them. Callers pass 0 in eval mode
            (as transformers' attention modules do). Backends without it (`NO_DROPOUT_BACKENDS`) refuse it;
            "auto" routes around them (to triton on GPUs).
        backend: ``"auto"`` (for CUDA tensors triton > cuda, but cuda > triton for a forward without
            gradient at L <= 128, triton alone with dropout; sdpa where neither runs: CPU tensors, GPUs older
            than Ampere, other head dims), ``"torch"`` (the eager reference), ``"sdpa"`` (torch's
            `scaled_dot_product_attention` with a padding mask), ``"triton"``, ``"cuda"`` (forward kernel; its
            backward runs the Triton backward kernels on the log-sum-exps it saves) or ``"flash"``
            (``flash_attn_varlen_func``, when flash-attn is installed).

    Returns:
        `[B, Hq, L, d]` in q's dtype. Rows at positions ``>= seq_lens[b]`` are exactly zero and
        pass zero gradient; padded keys get zero gradient. Softmax and accumulation run in fp32.
        Under `torch.autocast`, as SDPA: q, k and v in the autocast dtype, the output too.
    """
    cast = autocast_inputs(q, k, v)
    if cast is not None:
        with torch.autocast(q.device.type, enabled=False):
            return memory_attention(*cast, seq_lens, causal=causal, scale=scale, dropout_p=dropout_p,
                                    backend=backend)
    scale = check_memory_attention(q, k, v, seq_lens, causal, scale, dropout_p)
    chosen = resolve_backend("memory_attention", backend, q.device, q.dtype, cuda_op="memory_attention_fwd",
                             allowed=BACKENDS, unsupported=_unsupported(q, k, v, dropout_p),
                             auto_order=auto_order(q, k, v), fallback="sdpa")
    if chosen == "triton":
        from .triton import memory_attention_triton
        return memory_attention_triton(q, k, v, seq_lens, causal, scale, dropout_p)
    if chosen == "cuda":
        from .cuda import memory_attention_cuda
        return memory_attention_cuda(q, k, v, seq_lens, causal, scale)
    if chosen == "flash":
        from .flash import memory_attention_flash
        return memory_attention_flash(q, k, v, seq_lens, causal, scale)
    if chosen == "sdpa":
        from .sdpa import memory_attention_sdpa
        return memory_attention_sdpa(q, k, v, seq_lens, causal, scale, dropout_p)
    from .reference import memory_attention_reference
    return memory_attention_reference(q, k, v, seq_lens, causal, scale, dropout_p)

