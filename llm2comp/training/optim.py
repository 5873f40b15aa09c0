"""AdamW with linear warmup then linear, cosine or constant decay."""

from __future__ import annotations

import math

import torch

__all__ = ["lr_lambda", "make_optimizer"]


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr at step s: linear warmup over `warmup` steps, then decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, schedule: str,
                   warmup_ratio: float, total: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` and its per-step scheduler for a run of `total` optimizer steps."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, int(warmup_ratio * total), total))
    return optimizer, scheduler
