"""Process-group setup for ``torchrun`` and an all-gather that carries gradients."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["setup_distributed", "is_main", "rank_and_world", "gather_with_grad", "average_gradients",
           "broadcast_parameters", "all_mean", "digest64", "ranks_agree"]


def setup_distributed() -> torch.device:
    """Join the process group ``torchrun`` described in the environment, if any; the device to use.

    NCCL with one GPU per local rank when CUDA is available, gloo on CPU.
    """
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather in forward; in backward each rank receives the sum over ranks of the gradient
    of its own slice (all-reduce then slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`[R, ...]` on each of W ranks -> `[W * R, ...]` in rank order, differentiable.

    Every rank must pass the same shape. With DDP averaging parameter gradients over ranks, the
    mean of the per-rank losses on the gathered tensor has the gradient of one process computing
    the loss on the concatenated batch. Identity without a process group.
    """
    if rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of `params` to every rank (no-op on one process)."""
    if rank_and_world()[1] == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks, in one all-reduce of the flattened gradients.

    This is DDP's gradient synchronisation done once per optimizer step, after every micro-batch
    and GradCache chunk has accumulated; the trainable set (LoRA, memory embeddings) is small, so
    one flat buffer is cheap and needs no bucketing.
    """
    world = rank_and_world()[1]
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


def all_mean(value: float, device: torch.device) -> float:
    """Mean of a Python float over ranks (for logging)."""
    world = rank_and_world()[1]
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world


def digest64(parts: Iterable[bytes]) -> int:
    """A signed 64-bit hash of the bytes of `parts` in order, the same on every rank and run (an int64 that
    collectives can carry)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(part)
    return int.from_bytes(digest.digest(), "little", signed=True)


def ranks_agree(value: int, device: torch.device) -> bool:
    """Whether every rank passed the same int64 `value` (always on one process): one all-reduce of (v, -v)
    with MAX gives the largest and the smallest."""
    if rank_and_world()[1] == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] == -t[1])
