"""Attention-probability dropout of `memory_attention` (``dropout_p``): the keep rate and scaling, gradients
against the float64 reference under the same mask, padding, replay from the same seed, and backends refusing it.

The mask is read back from any backend with a probe: q = k = 0 makes every row's probabilities uniform
(1/n over its n keys) and v = the identity makes output column j the (dropped, rescaled) probability of key j,
so ``out * n * (1 - p)`` is the keep mask itself.
"""

from __future__ import annotations

import pytest
import torch

from llm2comp_kernels.memory_attention import memory_attention
from llm2comp_kernels.memory_attention.reference import memory_attention_reference
from tests.utils import assert_rel_close

DROPOUT_BACKENDS = ("torch", "sdpa")
P = 0.3


def _probe_inputs(B, H, L, seq_lens, dtype=torch.float32):
    q = torch.zeros(B, H, L, L, dtype=dtype)
    v = torch.eye(L, dtype=dtype).expand(B, H, L, L).contiguous()
    return q, q.clone(), v, torch.tensor(seq_lens, dtype=torch.int32)


def keep_mask(backend: str, B: int, H: int, L: int, seq_lens: list[int], p: float, seed: int) -> torch.Tensor:
    """The bool `[B, H, L, L]` keep mask `backend` draws from `seed` (rows and keys past seq_lens: False)."""
    q, k, v, lens = _probe_inputs(B, H, L, seq_lens)
    torch.manual_seed(seed)
    out = memory_attention(q, k, v, lens, dropout_p=p, backend=backend)
    scaled = out * lens[:, None, None, None].float() * (1 - p)
    assert torch.allclose(scaled, scaled.round(), atol=1e-4), "kept probabilities are not scaled by 1 / (1 - p)"
    return scaled.round().bool()


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_keep_rate_scaling_and_padding(backend):
    seq_lens = [64, 40, 1]
    mask = keep_mask(backend, 3, 4, 64, seq_lens, P, seed=0)
    valid = torch.arange(64) < torch.tensor(seq_lens)[:, None]
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    assert not mask[~allowed.expand_as(mask)].any()  # padded rows and keys: exact zeros
    kept = mask[allowed.expand_as(mask)].float()
    n = kept.numel()
    sigma = (P * (1 - P) / n) ** 0.5
    assert abs(kept.mean().item() - (1 - P)) < 5 * sigma, f"keep rate {kept.mean():.4f}, expected {1 - P}"


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_same_seed_same_masks_other_seed_other_masks(backend):
    a = keep_mask(backend, 2, 2, 16, [16, 9], P, seed=5)
    assert torch.equal(a, keep_mask(backend, 2, 2, 16, [16, 9], P, seed=5))
    assert not torch.equal(a, keep_mask(backend, 2, 2, 16, [16, 9], P, seed=6))


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_reference_under_the_same_mask(backend, causal):
    """The masks depend on the shape and seed, not the values: the probe's mask is the one the real inputs get,
    and the output and its gradients equal the float64 reference with that mask."""
    B, Hq, Hkv, L, d = 2, 4, 2, 13, 16
    seq_lens = [13, 7]
    mask = keep_mask(backend, B, Hq, L, seq_lens, P, seed=3)
    if causal:  # the probe is bidirectional; a causal row draws for every key and drops the future ones
        mask = mask & torch.ones(L, L, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, d, generator=g) for h in (Hq, Hkv, Hkv))
    grad_out = torch.randn(B, Hq, L, d, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.manual_seed(3)
    out = memory_attention(q, k, v, lens, causal=causal, dropout_p=P, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = memory_attention_reference(q64, k64, v64, lens, causal, d ** -0.5, P, keep=mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert_rel_close(out.double(), ref, tol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert_rel_close(got.double(), want, tol=1e-5)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_zero_dropout_is_the_plain_op(backend):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 9, 8, generator=g)
    lens = torch.tensor([9, 4])
    torch.testing.assert_close(memory_attention(q, q, q, lens, dropout_p=0.0, backend=backend),
                               memory_attention(q, q, q, lens, backend=backend))


def test_dropout_argument_checked():
    q = torch.randn(1, 1, 4, 8)
    lens = torch.tensor([4])
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            memory_attention(q, q, q, lens, dropout_p=bad)
    with pytest.raises(TypeError, match="dropout_p must be a number"):
        memory_attention(q, q, q, lens, dropout_p="0.1")


@pytest.mark.parametrize("backend", ["cuda", "flash"])
def test_backends_without_dropout_refuse_it(backend):
    q = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=rf"backend='{backend}' cannot run here: .*no attention dropout"):
        memory_attention(q, q, q, torch.tensor([4]), dropout_p=0.1, backend=backend)
