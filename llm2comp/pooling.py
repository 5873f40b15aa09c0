"""The pooling names of `LLM2Comp.encode`, without torch: what the command line offers when its parser is built."""

from __future__ import annotations

__all__ = ["POOLINGS", "check_pooling"]

POOLINGS = ("memory", "mean", "last")


def check_pooling(pooling: str) -> str:
    """`pooling` if it is one of `POOLINGS`, else ValueError."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return pooling
