import math

import pytest
import torch


@pytest.fixture(autouse=True)
def fixed_triton_blocks(monkeypatch):
    """Fixed Triton blocks (no autotuning) on a GPU too, except where a test re-enables it: tuning would
    compile every config for each shape, dtype and flag of the test matrix, minutes of GPU time."""
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "0")


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Make torch.empty/empty_like/new_empty return NaN-filled tensors, so an element a kernel forgets to
    write shows up as NaN instead of as whatever the allocator handed back (often zeros)."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: poison(new_empty(self, *a, **kw)))
