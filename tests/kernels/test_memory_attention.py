"""Tests of `memory_attention`: the reference against independent formulas, argument errors, and every
backend (forward and the three grads) against the float64 reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm2comp_kernels._backends import why_not
from llm2comp_kernels.memory_attention import memory_attention
from llm2comp_kernels.memory_attention.api import TRITON_HEAD_DIMS
from llm2comp_kernels.memory_attention.reference import memory_attention_reference
from llm2comp_kernels.testing import make_attention_inputs, rel_err
from tests.utils import assert_rel_close, backend_cases

BACKENDS = backend_cases("memory_attention_fwd", ("torch", "sdpa", "triton", "cuda"))

_TRITON_UNAVAILABLE = why_not("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32,
                              None)
needs_triton = pytest.mark.skipif(_TRITON_UNAVAILABLE is not None, reason=str(_TRITON_UNAVAILABLE))


# ---------------------------------------------------------------- independent formulations of the op


def _per_row_attention(q, k, v, seq_lens, causal, scale):
    """One query row at a time: softmax over exactly the keys that row may see (no -inf masking)."""
    B, Hq, L, _ = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(seq_lens[b])
        for h in range(Hq):
            for i in range(n):
                last = i + 1 if causal else n
                keys, values = k[b, h // group, :last], v[b, h // group, :last]
                out[b, h, i] = torch.softmax(keys @ q[b, h, i] * scale, dim=0) @ values
    return out


def _mask(seq_lens, L, causal):
    """Bool `[B, 1, L, L]`: key j is real (and j <= i when causal); and bool `[B, L]` of real positions."""
    valid = torch.arange(L, device=seq_lens.device) < seq_lens[:, None]
    allowed = valid[:, None, None, :].expand(-1, 1, L, L)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=seq_lens.device).tril()
    return allowed, valid


def _sdpa_attention(q, k, v, seq_lens, causal, scale):
    """F.scaled_dot_product_attention with a bool mask on repeated kv heads, padded rows zeroed."""
    group = q.shape[1] // k.shape[1]
    allowed, valid = _mask(seq_lens, q.shape[2], causal)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=allowed, scale=scale)
    return out * valid[:, None, :, None]


def _eager_attention(q, k, v, seq_lens, causal, scale):
    """Eager attention in q's dtype as transformers' `eager_attention_forward` does it (matmuls in q's dtype,
    softmax in float32 then cast back): the error a same-dtype PyTorch model gets, used as the budget."""
    group = q.shape[1] // k.shape[1]
    allowed, valid = _mask(seq_lens, q.shape[2], causal)
    scores = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v.repeat_interleave(group, 1)) * valid[:, None, :, None]


def _upcast(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_independent_formulas(causal):
    q, k, v, seq_lens = make_attention_inputs(3, 6, 2, 9, 8, dtype=torch.float64, requires_grad=False)
    ref = memory_attention_reference(q, k, v, seq_lens, causal, 0.3)
    assert_rel_close(ref, _per_row_attention(q, k, v, seq_lens, causal, 0.3), tol=1e-12, name="vs per-row")
    assert_rel_close(ref, _sdpa_attention(q, k, v, seq_lens, causal, 0.3), tol=1e-12, name="vs sdpa")


@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradcheck(causal):
    q, k, v, seq_lens = make_attention_inputs(3, 3, 1, 5, 4, dtype=torch.float64, seq_lens=torch.tensor([5, 2, 1]))
    assert torch.autograd.gradcheck(lambda q, k, v: memory_attention_reference(q, k, v, seq_lens, causal, 0.7),
                                    (q, k, v))


def test_reference_padding_is_zero_and_gets_zero_grad():
    q, k, v, seq_lens = make_attention_inputs(3, 4, 2, 7, 8, dtype=torch.float64)
    out = memory_attention_reference(q, k, v, seq_lens, False, 0.5)
    out.backward(torch.randn_like(out))
    pad = torch.arange(7) >= seq_lens[:, None]
    assert (out.transpose(1, 2)[pad] == 0).all()
    for name, grad in (("q", q.grad), ("k", k.grad), ("v", v.grad)):
        assert (grad.transpose(1, 2)[pad] == 0).all(), name


# ---------------------------------------------------------------- argument errors


def _args(d=16, **change):
    q, k, v, seq_lens = make_attention_inputs(2, 4, 2, 5, d, requires_grad=False)
    args = {"q": q, "k": k, "v": v, "seq_lens": seq_lens}
    args.update(change)
    return args


def _bad_cases():
    q, k, v, seq_lens = make_attention_inputs(2, 4, 2, 5, 16, requires_grad=False)
    return [
        ("q rank", _args(q=q[0]), {}, ValueError, "q must have 4 dims"),
        ("q not tensor", _args(q=q.tolist()), {}, TypeError, "q must be a torch.Tensor"),
        ("q int", _args(q=q.long()), {}, TypeError, "q must be"),
        ("k batch", _args(k=k[:1], v=v[:1]), {}, ValueError, "batch size"),
        ("k length", _args(k=k[:, :, :4], v=v[:, :, :4]), {}, ValueError, "sequence length"),
        ("k head dim", _args(k=k[..., :4], v=v[..., :4]), {}, ValueError, "head dim"),
        ("k v shapes", _args(v=v[:, :1]), {}, ValueError, "same shape"),
        ("heads", _args(k=torch.randn(2, 3, 5, 16), v=torch.randn(2, 3, 5, 16)), {}, ValueError, "multiple"),
        ("dtype", _args(k=k.double()), {}, TypeError, "k has dtype"),
        ("seq_lens float", _args(seq_lens=seq_lens.float()), {}, TypeError, "seq_lens must be"),
        ("seq_lens size", _args(seq_lens=seq_lens[:1]), {}, ValueError, "seq_lens"),
        ("seq_lens 0", _args(seq_lens=torch.tensor([0, 3])), {}, ValueError, r"seq_lens\[0\] = 0"),
        ("seq_lens > L", _args(seq_lens=torch.tensor([3, 6])), {}, ValueError, r"seq_lens\[1\] = 6"),
        ("empty batch", _args(q=q[:0], k=k[:0], v=v[:0], seq_lens=seq_lens[:0]), {}, ValueError, "empty"),
        ("causal int", _args(), {"causal": 1}, TypeError, "causal must be a bool"),
        ("causal numpy", _args(), {"causal": np.bool_(True)}, TypeError, "causal must be a bool, got numpy.bool"),
        ("scale 0", _args(), {"scale": 0.0}, ValueError, "scale"),
        ("scale < 0", _args(), {"scale": -1.0}, ValueError, "scale"),
        ("scale nan", _args(), {"scale": math.nan}, ValueError, "scale"),
        ("scale str", _args(), {"scale": "1"}, TypeError, "scale"),
        ("backend", _args(), {"backend": "nope"}, ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize(("args", "kwargs", "error", "match"),
                         [pytest.param(*case[1:], id=case[0]) for case in _bad_cases()])
def test_bad_inputs_raise(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        memory_attention(**args, **kwargs)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    args = _args()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        memory_attention(**args, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        memory_attention(**args, backend="triton")


@needs_triton
def test_triton_rejects_unsupported_head_dim():
    with pytest.raises(RuntimeError, match="head dims"):
        memory_attention(**_args(d=8), backend="triton")


# ---------------------------------------------------------------- backends against the float64 reference

# (L, Hq, Hkv, d, causal, dtype). The default set covers each L, head layout, head dim, mask and dtype at
# least once; the slow set is the full product.
DTYPES = (torch.float32, torch.bfloat16)
DEFAULT_CASES = [
    (1, 4, 4, 64, False, torch.float32),
    (17, 6, 2, 80, True, torch.float32),
    (64, 4, 4, 80, False, torch.float32),
    (130, 6, 2, 64, True, torch.float32),
    (1, 8, 1, 80, True, torch.bfloat16),
    (17, 4, 4, 80, False, torch.bfloat16),
    (64, 8, 1, 64, True, torch.bfloat16),
    (130, 6, 2, 64, False, torch.bfloat16),
]
FULL_CASES = [(L, Hq, Hkv, d, causal, dtype)
              for L, (Hq, Hkv), d, causal, dtype in itertools.product((1, 17, 64, 130), ((4, 4), (6, 2), (8, 1)),
                                                                    (64, 80), (False, True), DTYPES)
              if (L, Hq, Hkv, d, causal, dtype) not in DEFAULT_CASES]


def _case_id(case):
    L, Hq, Hkv, d, causal, dtype = case
    return f"L{L}-h{Hq}/{Hkv}-d{d}-{'causal' if causal else 'bidir'}-{str(dtype)[6:]}"


def _check_against_reference(backend, device, case, B=3, seq_lens=None):
    """Forward and dq/dk/dv of `backend` vs the float64 reference, with a random upstream grad; padded
    output rows and padded grads must be exactly zero."""
    L, Hq, Hkv, d, causal, dtype = case
    if backend == "cuda" and (dtype not in (torch.float16, torch.bfloat16) or d not in (64, 128)):
        pytest.skip("the cuda backend covers float16/bfloat16 with d in {64, 128}")
    q, k, v, seq_lens = make_attention_inputs(B, Hq, Hkv, L, d, dtype=dtype, device=device, seq_lens=seq_lens)
    scale = d ** -0.5
    out = memory_attention(q, k, v, seq_lens, causal=causal, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    out.backward(grad_out)
    q64, k64, v64 = _upcast(q, k, v)
    ref = memory_attention_reference(q64, k64, v64, seq_lens, causal, scale)
    ref.backward(grad_out.double())
    pairs = {"out": (out, ref), "dq": (q.grad, q64.grad), "dk": (k.grad, k64.grad), "dv": (v.grad, v64.grad)}
    if dtype == torch.float32:
        tols = dict.fromkeys(pairs)  # the float32 budget of testing.REL_TOL
    else:
        # Budget derived from PyTorch's own error in the same dtype: kernel err <= 2 x eager err + 1e-3.
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        eager = _eager_attention(ql, kl, vl, seq_lens, causal, scale)
        eager.backward(grad_out)
        eager_pairs = {"out": eager, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
        tols = {name: 2 * rel_err(eager_pairs[name], pairs[name][1]) + 1e-3 for name in pairs}
    for name, (got, want) in pairs.items():
        assert got.dtype == dtype, name
        assert_rel_close(got, want, tol=tols[name], name=name)
    pad = torch.arange(L, device=device) >= seq_lens[:, None]          # [B, L]
    for name, got in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert (got.detach().transpose(1, 2)[pad] == 0).all(), f"{name}: padded rows are not exactly zero"


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case, device, poison_empty):
    _check_against_reference(backend, device, case)


@pytest.mark.parametrize("case", DEFAULT_CASES[:4], ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_without_padding(backend, case, device):
    """Every row full (the sdpa backend then runs SDPA without a mask on the CPU)."""
    _check_against_reference(backend, device, case, seq_lens=torch.full((3,), case[0], dtype=torch.int32))


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_full(backend, case, device, poison_empty):
    _check_against_reference(backend, device, case)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_realistic(backend, causal, device, monkeypatch):
    """Model-sized: B=4, L=1000, 32 query heads over 8 kv heads, d=128, bf16, lengths 1 .. L; autotuned."""
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "1")
    seq_lens = torch.tensor([1000, 517, 1, 873], dtype=torch.int32, device=device)
    _check_against_reference(backend, device, (1000, 32, 8, 128, causal, torch.bfloat16), B=4, seq_lens=seq_lens)


@pytest.mark.gpu
@pytest.mark.parametrize("d, dtype", [(64, torch.float32), (128, torch.float32), (256, torch.bfloat16)],
                         ids=["64-float32", "128-float32", "256-bfloat16"])
def test_triton_autotuned_unusual_inputs_gpu(d, dtype, device, monkeypatch):
    """Autotuned where the common tiles do not fit: float32 tunes over its own smaller tiles (the bf16 ones exceed
    an A100's shared memory at d=128), and head dim 256 (Gemma) has tiles of its own."""
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "1")
    seq_lens = torch.tensor([300, 77], dtype=torch.int32, device=device)
    _check_against_reference("triton", device, (300, 8, 2, d, False, dtype), B=2, seq_lens=seq_lens)


@pytest.mark.gpu
def test_triton_tuned_then_direct_launches_agree(device, monkeypatch):
    """Autotuned: the first call of a shape goes through triton.autotune, the second launches the kernels
    directly with the configs it chose (TunedLauncher); both give bitwise the same output and gradients."""
    from llm2comp_kernels.memory_attention import triton as backend

    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "1")
    q, k, v, seq_lens = make_attention_inputs(2, 8, 2, 333, 64, dtype=torch.bfloat16, device=device,
                                              seq_lens=torch.tensor([333, 100]))
    runs = []
    for _ in range(2):
        out = memory_attention(q, k, v, seq_lens, backend="triton")
        runs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
        torch.cuda.synchronize()
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    key = backend._tune_key(q, seq_lens, 64, False, backend._l_bucket(333))
    assert all(key in launcher.best for launcher in backend._LAUNCHERS.values())


@pytest.mark.gpu
@pytest.mark.parametrize("d", TRITON_HEAD_DIMS)
def test_triton_every_head_dim_gpu(d, device):
    _check_against_reference("triton", device, (200, 4, 2, d, True, torch.bfloat16))


@needs_triton
@pytest.mark.parametrize("d", [16, 96, 128])
def test_triton_other_head_dims(d, device):
    _check_against_reference("triton", device, (33, 2, 1, d, False, torch.float32), B=2)


# ---------------------------------------------------------------- Triton-specific properties



def _run_triton(q, k, v, seq_lens, causal, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = memory_attention(q, k, v, seq_lens, causal=causal, backend="triton")
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_never_reads_padding(causal, device):
    """NaN in every padded position of q, k, v and of the upstream grad changes nothing: padding is
    skipped, not masked after the fact."""
    B, Hq, Hkv, L, d = 3, 4, 2, 40, 16
    q, k, v, seq_lens = make_attention_inputs(B, Hq, Hkv, L, d, device=device, requires_grad=False)
    grad_out = torch.randn(B, Hq, L, d, device=device)
    clean = _run_triton(q, k, v, seq_lens, causal, grad_out)
    pad = (torch.arange(L, device=device) >= seq_lens[:, None])[:, None, :, None]
    dirty = _run_triton(*(t.masked_fill(pad, math.nan) for t in (q, k, v)), seq_lens, causal,
                        grad_out.masked_fill(pad, math.nan))
    for name, a, b in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.equal(a, b), name


@needs_triton
def test_triton_strided_inputs_match_contiguous(device):
    """q/k/v as transposes of [B, L, H, d] projections (the model's layout) give the contiguous result."""
    B, Hq, Hkv, L, d = 2, 4, 2, 24, 16
    q, k, v, seq_lens = make_attention_inputs(B, Hq, Hkv, L, d, device=device, requires_grad=False)
    grad_out = torch.randn(B, Hq, L, d, device=device)
    contiguous = _run_triton(q, k, v, seq_lens, True, grad_out)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    for name, a, b in zip(("out", "dq", "dk", "dv"), contiguous, _run_triton(*strided, seq_lens, True, grad_out)):
        assert_rel_close(b, a, tol=1e-6, name=name)


def test_seq_lens_checked_again_after_in_place_change():
    # The range check is cached per tensor object and version: an in-place edit must be re-checked.
    q, k, v, seq_lens = make_attention_inputs(2, 2, 2, 5, 16, requires_grad=False)
    memory_attention(q, k, v, seq_lens, backend="torch")
    memory_attention(q, k, v, seq_lens, backend="torch")
    seq_lens[0] = 6
    with pytest.raises(ValueError, match="seq_lens"):
        memory_attention(q, k, v, seq_lens, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_grad_same_output_and_no_graph(backend, device):
    """Under no_grad, or on inputs that need no grad, the backends call their forward without the autograd
    Function: the same values, and no graph."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, seq_lens = make_attention_inputs(3, 4, 2, 17, 64, dtype=dtype, device=device)
    with_grad = memory_attention(q, k, v, seq_lens, backend=backend)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        no_grad = memory_attention(q, k, v, seq_lens, backend=backend)
    frozen = memory_attention(q.detach(), k.detach(), v.detach(), seq_lens, backend=backend)
    for out in (no_grad, frozen):
        assert out.grad_fn is None and torch.equal(out, with_grad.detach())


@pytest.mark.parametrize("backend", backend_cases("memory_attention_fwd", ("torch", "sdpa", "triton")))
def test_non_finite_padding_reaches_no_real_row(backend, device):
    """An inf or NaN in a padded row (fp16 overflow in its MLP, say) changes nothing real: not the output, not the
    gradients of the real rows (torch and sdpa zero the padding first; 0 x inf in their masked products gave NaN
    rows)."""
    q, k, v, seq_lens = make_attention_inputs(2, 4, 2, 9, 16, device=device, seq_lens=torch.tensor([9, 5]))
    ref = memory_attention(q, k, v, seq_lens, backend=backend)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    clean = [t.grad.clone() for t in (q, k, v)]
    poisoned = [t.detach().clone() for t in (q, k, v)]
    poisoned[0][1, :, 7], poisoned[1][1, :, 6], poisoned[2][1, :, 8] = float("nan"), float("inf"), float("-inf")
    poisoned = [t.requires_grad_() for t in poisoned]
    out = memory_attention(*poisoned, seq_lens, backend=backend)
    out.backward(grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, want in zip((t.grad for t in poisoned), clean):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
