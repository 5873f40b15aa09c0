"""Attention-probability dropout of `memory_attention` (``dropout_p``): the keep rate and scaling, gradients
against the float64 reference under the same mask, padding, replay from the same seed, and backends refusing it.

The mask is read back from any backend with a probe: q = k = 0 makes every row's probabilities uniform
(1/n over its n keys) and v = the identity makes output column j the (dropped, rescaled) probability of key j,
so ``out * n * (1 - p)`` is the keep mask itself. The Triton kernels' mask also comes straight from
`dropout_keep_mask` (the kernels' Philox counters, from the (seed, offset) a call draws); the probe checks it.
Under ``TRITON_INTERPRET=1`` the Triton cases run on the CPU; the shapes are small for the interpreter's sake.
"""

from __future__ import annotations

import math

import pytest
import torch

from llm2comp_kernels.memory_attention import memory_attention
from llm2comp_kernels.memory_attention.api import TRITON_HEAD_DIMS, _unsupported
from llm2comp_kernels.memory_attention.reference import memory_attention_reference
from llm2comp_kernels.nn import MemoryAttention
from llm2comp_kernels.testing import rel_err
from tests.utils import assert_rel_close, backend_cases

DROPOUT_BACKENDS = backend_cases(None, ("torch", "sdpa", "triton"))
TRITON = backend_cases(None, ("triton",))
P = 0.3


def _triton():
    from llm2comp_kernels.memory_attention import triton as backend
    return backend


def _probe_inputs(B, H, L, seq_lens, device, dtype=torch.float32):
    """q = k = 0 and v = the `[L, d]` identity, d the smallest head dim every backend takes with d >= L."""
    d = min(x for x in TRITON_HEAD_DIMS if x >= L)
    q = torch.zeros(B, H, L, d, dtype=dtype, device=device)
    v = torch.eye(L, d, dtype=dtype, device=device).expand(B, H, L, d).contiguous()
    return q, q.clone(), v, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def keep_mask(backend: str, B: int, H: int, L: int, seq_lens: list[int], p: float, seed: int,
              device="cpu") -> torch.Tensor:
    """The bool `[B, H, L, L]` keep mask `backend` draws from `seed` (rows and keys past seq_lens: False)."""
    q, k, v, lens = _probe_inputs(B, H, L, seq_lens, device)
    torch.manual_seed(seed)
    out = memory_attention(q, k, v, lens, dropout_p=p, backend=backend)[..., :L]
    scaled = out * lens[:, None, None, None].float() * (1 - p)
    assert torch.allclose(scaled, scaled.round(), atol=1e-4), "kept probabilities are not scaled by 1 / (1 - p)"
    return scaled.round().bool().cpu()


def _allowed(seq_lens, L, causal=False):
    """Bool `[B, 1, L, L]`: query i and key j both real (and j <= i when causal)."""
    valid = torch.arange(L) < torch.tensor(seq_lens)[:, None]
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    return allowed & torch.ones(L, L, dtype=torch.bool).tril() if causal else allowed


def _triton_mask(seed, B, H, L, p, device):
    """The keep mask a Triton call draws after ``torch.manual_seed(seed)`` (CPU bool `[B, H, L, L]`)."""
    backend = _triton()
    torch.manual_seed(seed)
    return backend.dropout_keep_mask(backend.draw_philox(device), B, H, L, p).cpu()


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_keep_rate_scaling_and_padding(backend, device):
    seq_lens = [64, 40, 1]
    mask = keep_mask(backend, 3, 4, 64, seq_lens, P, seed=0, device=device)
    allowed = _allowed(seq_lens, 64).expand_as(mask)
    assert not mask[~allowed].any()  # padded rows and keys: exact zeros
    kept = mask[allowed].float()
    sigma = (P * (1 - P) / kept.numel()) ** 0.5
    assert abs(kept.mean().item() - (1 - P)) < 5 * sigma, f"keep rate {kept.mean():.4f}, expected {1 - P}"


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_same_seed_same_masks_other_seed_other_masks(backend, device):
    a = keep_mask(backend, 2, 2, 16, [16, 9], P, seed=5, device=device)
    assert torch.equal(a, keep_mask(backend, 2, 2, 16, [16, 9], P, seed=5, device=device))
    assert not torch.equal(a, keep_mask(backend, 2, 2, 16, [16, 9], P, seed=6, device=device))
    # every (batch row, head) draws its own mask
    assert not torch.equal(a[0, 0], a[0, 1]) and not torch.equal(a[0, 0, :9, :9], a[1, 0, :9, :9])


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_reference_under_the_same_mask(backend, causal, device):
    """The masks depend on the shape and seed, not the values: the probe's mask is the one the real inputs get,
    and the output and its gradients equal the float64 reference with that mask."""
    B, Hq, Hkv, L, d = 2, 4, 2, 13, 16
    seq_lens = [13, 7]
    mask = keep_mask(backend, B, Hq, L, seq_lens, P, seed=3, device=device)
    if causal:  # the probe is bidirectional; a causal row draws for every key and drops the future ones
        mask = mask & torch.ones(L, L, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, d, generator=g) for h in (Hq, Hkv, Hkv))
    grad_out = torch.randn(B, Hq, L, d, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    torch.manual_seed(3)
    out = memory_attention(q, k, v, lens.to(device), causal=causal, dropout_p=P, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(device))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = memory_attention_reference(q64, k64, v64, lens, causal, d ** -0.5, P, keep=mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert_rel_close(out.cpu().double(), ref, tol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert_rel_close(got.cpu().double(), want, tol=1e-5)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_zero_dropout_is_the_plain_op(backend, device):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 9, 16, generator=g).to(device)
    lens = torch.tensor([9, 4], device=device)
    torch.testing.assert_close(memory_attention(q, q, q, lens, dropout_p=0.0, backend=backend),
                               memory_attention(q, q, q, lens, backend=backend))


# ---------------------------------------------------------------- the Triton kernels' own mask


@pytest.mark.parametrize("backend", TRITON)
def test_triton_keep_mask_is_the_one_the_kernels_apply(backend, device):
    """`dropout_keep_mask` of the (seed, offset) a call draws is what the probe reads back from its output, at an
    L that is not a multiple of any block."""
    B, H, L, seq_lens = 2, 3, 21, [21, 11]
    probed = keep_mask(backend, B, H, L, seq_lens, P, seed=7, device=device)
    mask = _triton_mask(7, B, H, L, P, device)
    allowed = _allowed(seq_lens, L).expand_as(mask)
    assert torch.equal(probed, mask & allowed)
    kept = mask.float().mean().item()  # all B * H * L * L draws, padding too
    assert abs(kept - (1 - P)) < 5 * (P * (1 - P) / mask.numel()) ** 0.5


def _odd_case_id(case):
    B, Hq, Hkv, L, d, causal, seq_lens = case
    return f"B{B}-L{L}-h{Hq}/{Hkv}-d{d}-{'causal' if causal else 'bidir'}"


# (B, Hq, Hkv, L, d, causal, seq_lens): L off the blocks (32/16 forward and dq, 16/32 dk/dv under the
# interpreter), grouped heads, a one-token row, a head dim padded inside the kernels.
ODD_CASES = [
    (3, 6, 2, 37, 16, True, [37, 20, 1]),
    (2, 4, 1, 33, 48, False, [33, 17]),
    (2, 2, 2, 1, 16, False, [1, 1]),
]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", ODD_CASES, ids=_odd_case_id)
def test_triton_matches_reference_under_its_mask(backend, case, device, poison_empty):
    """Output and dq/dk/dv against the float64 reference given the kernels' mask (`dropout_keep_mask`); padded
    outputs and gradients exactly zero, and NaN in the padding of q, k, v and the upstream gradient reaches
    nothing."""
    B, Hq, Hkv, L, d, causal, seq_lens = case
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, h, L, d, generator=g) for h in (Hq, Hkv, Hkv))
    grad_out = torch.randn(B, Hq, L, d, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    pad = (torch.arange(L) >= lens[:, None])[:, None, :, None]
    q, k, v, grad_out = (t.masked_fill(pad, math.nan) for t in (q, k, v, grad_out))
    mask = _triton_mask(11, B, Hq, L, P, device)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out = memory_attention(*leaves, lens.to(device), causal=causal, dropout_p=P, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = memory_attention_reference(q64, k64, v64, lens, causal, d ** -0.5, P, keep=mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double().nan_to_num())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_rel_close(got.cpu().double(), want, tol=1e-5, name=name)
        assert (got.cpu()[pad.expand_as(got)] == 0).all(), f"{name}: padded rows are not exactly zero"


@pytest.mark.parametrize("backend", TRITON)
def test_triton_mask_does_not_depend_on_block_sizes(backend, device, monkeypatch):
    """Each probability's random number comes from its global (b, h, i, j): other tiles for every kernel give the
    same output and gradients (up to summation order)."""
    backend_module = _triton()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 29, 16, generator=g).to(device) for h in (4, 2, 2))
    lens = torch.tensor([29, 18], device=device)
    grad_out = torch.randn(2, 4, 29, 16, generator=torch.Generator().manual_seed(9)).to(device)

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(4)
        out = memory_attention(*leaves, lens, causal=True, dropout_p=P, backend=backend)
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    first = run()
    monkeypatch.setattr(backend_module, "_FIXED_BLOCKS", {"fwd": (16, 32), "dq": (16, 16), "dkdv": (32, 16)})
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, run()):
        assert_rel_close(b, a, tol=1e-6, name=name)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_replays_masks_from_torch_rng_state(backend, device):
    """Restoring torch's RNG state replays a call bit for bit, forward and backward (what GradCache's second pass
    relies on); the backward regenerates the forward's mask, whatever was drawn in between; the next call draws a
    new one."""
    q, k, v = (torch.randn(2, 2, 19, 16, generator=torch.Generator().manual_seed(i)).to(device) for i in range(3))
    lens = torch.tensor([19, 12], device=device)
    grad_out = torch.randn(2, 2, 19, 16, generator=torch.Generator().manual_seed(5)).to(device)

    def step(draw_between=False):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = memory_attention(*leaves, lens, dropout_p=P, backend=backend)
        if draw_between:
            torch.rand(100, device=device)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]

    torch.manual_seed(0)
    state = torch.get_rng_state(), (torch.cuda.get_rng_state() if q.is_cuda else None)
    first, second = step(), step()
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
    replay = step(draw_between=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, replay):
        assert torch.equal(a, b), f"{name}: not replayed"
    assert not torch.equal(first[0], second[0]), "two calls drew the same mask"


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("causal", [False, True])
def test_triton_backward_from_saved_without_dropout(backend, causal, device):
    """The CUDA forward's backward (`memory_attention_triton_backward`: the Triton backward kernels on a saved
    output and log-sum-exps, the dropout-free variant) gives the reference gradients; here fed the reference's
    output and lse."""
    from llm2comp_kernels.memory_attention.reference import memory_attention_lse_reference
    from llm2comp_kernels.memory_attention.triton import memory_attention_triton_backward

    B, Hq, Hkv, L, d = 2, 4, 2, 23, 16
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(B, h, L, d, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    grad_out = torch.randn(B, Hq, L, d, generator=g, dtype=torch.float64)
    lens = torch.tensor([23, 9])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = memory_attention_reference(*leaves, lens, causal, d ** -0.5)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    lse = memory_attention_lse_reference(q, k, lens, causal, d ** -0.5).float()
    grads = memory_attention_triton_backward(*(t.float().to(device) for t in (q, k, v)), lens.to(device),
                                             ref.detach().float().to(device), lse.to(device),
                                             grad_out.float().to(device), causal, d ** -0.5)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(got.cpu().double(), want, tol=1e-5, name=name)


def test_only_cuda_and_flash_refuse_dropout():
    """Which backends refuse dropout: cuda and flash by name, not triton (so "auto" picks triton for it on a
    GPU; see the GPU test below)."""
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    reasons = _unsupported(q, q, q, 0.1)
    assert "triton" not in reasons
    for name in ("cuda", "flash"):
        assert "no attention dropout" in reasons[name], name
    assert _unsupported(q, q, q, 0.0) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("requires_grad, L", [(True, 300), (False, 64)])
def test_auto_picks_triton_for_dropout_gpu(requires_grad, L, device, monkeypatch):
    """On a GPU "auto" with dropout runs the Triton kernels, also for a short forward without gradient (where the
    CUDA forward comes first without dropout)."""
    backend = _triton()
    calls = []
    original = backend.memory_attention_triton
    monkeypatch.setattr(backend, "memory_attention_triton", lambda *a: calls.append(a[-1]) or original(*a))
    q = torch.randn(2, 4, L, 64, dtype=torch.bfloat16, device=device, requires_grad=requires_grad)
    memory_attention(q, q, q, torch.tensor([L, 5], device=device), dropout_p=0.1)
    assert calls == [0.1]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_triton_dropout_realistic_gpu(causal, device, monkeypatch):
    """Model-sized, bf16, autotuned: output and gradients against the float64 reference with the kernels' mask,
    within twice the error of eager bf16 attention under the same mask (+1e-3)."""
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "1")
    B, Hq, Hkv, L, d = 3, 16, 4, 700, 128
    lens = torch.tensor([700, 333, 1], device=device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, h, L, d, generator=g, device=device, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    grad_out = torch.randn(B, Hq, L, d, generator=g, device=device, dtype=torch.bfloat16)
    backend = _triton()
    torch.manual_seed(1)
    mask = backend.dropout_keep_mask(backend.draw_philox(device), B, Hq, L, P)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(1)
    out = memory_attention(*leaves, lens, causal=causal, dropout_p=P, backend="triton")
    got = [out, *torch.autograd.grad(out, leaves, grad_out)]
    scale = d ** -0.5

    def grads_of(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        y = fn(*xs)
        return [y, *torch.autograd.grad(y, xs, grad_out.to(dtype))]

    ref = grads_of(lambda q, k, v: memory_attention_reference(q, k, v, lens, causal, scale, P, keep=mask),
                   torch.float64)

    def eager(q, k, v):
        valid = torch.arange(L, device=device) < lens[:, None]
        allowed = valid[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=device).tril()
        group = Hq // Hkv
        q, k, v = (t.masked_fill(~valid[:, None, :, None], 0) for t in (q, k, v))
        s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1, dtype=torch.float32).to(q.dtype)
        p = p * mask / (1 - P)
        return (p @ v.repeat_interleave(group, 1)) * valid[:, None, :, None]

    budget = grads_of(eager, torch.bfloat16)
    for name, a, e, r in zip(("out", "dq", "dk", "dv"), got, budget, ref):
        assert_rel_close(a, r, tol=2 * rel_err(e, r) + 1e-3, name=name)


# ---------------------------------------------------------------- the module


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_module_drops_in_training_mode_only(backend, device):
    q, k, v, lens = _probe_inputs(2, 2, 16, [16, 9], device)
    module = MemoryAttention(dropout=P, backend=backend)
    assert module.training and "dropout=0.3" in repr(module)
    torch.manual_seed(5)
    train = module(q, k, v, lens)
    torch.manual_seed(5)
    assert torch.equal(train, memory_attention(q, k, v, lens, dropout_p=P, backend=backend))
    assert not torch.equal(train, memory_attention(q, k, v, lens, backend=backend))
    module.eval()
    torch.testing.assert_close(module(q, k, v, lens), memory_attention(q, k, v, lens, backend=backend),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- arguments and refusals


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
