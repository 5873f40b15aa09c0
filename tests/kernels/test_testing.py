"""The input factories of `llm2comp_kernels.testing`: seeded on the CPU by default, so every device gets the same
values (what the tests compare), or drawn on the device (the benchmarks' GPU-sized inputs)."""

import pytest
import torch

from llm2comp_kernels.testing import make_contrastive_inputs, make_linear_kl_inputs, make_pool_inputs

FACTORIES = [(make_pool_inputs, (3, 7, 5), {"span": 4}), (make_pool_inputs, (3, 7, 5), {}),
             (make_contrastive_inputs, (3, 5, 8), {}), (make_linear_kl_inputs, (4, 8, 11), {})]


@pytest.mark.parametrize("factory, sizes, options", FACTORIES)
def test_inputs_drawn_on_the_device_are_like_the_cpu_seeded_ones(factory, sizes, options, device):
    seeded = factory(*sizes, device=device, **options)
    drawn = factory(*sizes, device=device, draw_on_device=True, **options)
    assert [(t.shape, t.dtype, t.device, t.requires_grad) for t in seeded] == [
        (t.shape, t.dtype, t.device, t.requires_grad) for t in drawn]
    assert all(torch.equal(a, b) for a, b in zip(seeded, drawn)) == (torch.device(device).type == "cpu")
    if factory is make_pool_inputs:  # spans inside the rows, on either path
        hidden, start, length = drawn
        assert bool((start >= 0).all() and (length >= 1).all() and (start + length <= hidden.shape[1]).all())
