"""Tests of `linear_kl_loss`: the torch backend against an independent full-logits formula and gradcheck,
its chunking, argument errors, and every backend (loss and the two grads) against the float64 torch backend."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llm2comp_kernels._backends import why_not
from llm2comp_kernels.linear_kl_loss import linear_kl_loss
from llm2comp_kernels.testing import make_linear_kl_inputs, rel_err
from tests.utils import assert_rel_close, backend_cases

BACKENDS = backend_cases(None, backends=("torch", "triton"))
_TRITON_UNAVAILABLE = why_not("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32,
                              None)
needs_triton = pytest.mark.skipif(_TRITON_UNAVAILABLE is not None, reason=str(_TRITON_UNAVAILABLE))
UPSTREAM = 1.7          # d out / d loss != 1, so a backward that ignores grad_loss fails
BF16_UNIT = 2.0 ** -8   # unit roundoff of bfloat16


def _make_mask(kind: str, N: int, device) -> torch.Tensor | None:
    """None (all rows), "some" (every third row dropped) or "nothing" (no row selected)."""
    if kind == "all":
        return None
    if kind == "nothing":
        return torch.zeros(N, dtype=torch.bool, device=device)
    return (torch.arange(N, device=device) % 3 != 1)


def _run(student, teacher, weight, **kwargs):
    """Loss and (grad student, grad weight or None) after backward of UPSTREAM * loss, on fresh leaves."""
    s = student.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = linear_kl_loss(s, teacher.detach().clone(), w, **kwargs)
    (UPSTREAM * loss).backward()
    return loss.detach(), s.grad, w.grad


def _float64(student, teacher, weight, **kwargs):
    """The float64 torch backend on the same (rounded) inputs: the oracle of the backend tests."""
    w = weight.detach().double().requires_grad_(weight.requires_grad)
    return _run(student.detach().double(), teacher.double(), w, **{**kwargs, "backend": "torch"})


# ---------------------------------------------------------------- the torch backend vs independent formulas


def _full_logits_kl(student, teacher, weight, mask, temperature):
    """Mean over selected rows of F.kl_div on the full `[N, V]` logits (the naive formulation)."""
    log_ps = torch.log_softmax(student @ weight.T / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher @ weight.T / temperature, dim=-1).detach()
    if mask is not None:
        log_ps, log_pt = log_ps[mask], log_pt[mask]
    kl = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
    return kl / max(log_ps.shape[0], 1)


@pytest.mark.parametrize("V, N", [(7, 5), (1031, 70)])
@pytest.mark.parametrize("mask_kind", ["all", "some", "nothing"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_torch_backend_matches_full_logits_kl_div(V, N, mask_kind, temperature):
    student, teacher, weight = make_linear_kl_inputs(N, 16, V, dtype=torch.float64)
    mask = _make_mask(mask_kind, N, "cpu")
    got = _run(student, teacher, weight, mask=mask, temperature=temperature, chunk_size=3, backend="torch")
    s = student.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = _full_logits_kl(s, teacher, w, mask, temperature)
    (UPSTREAM * loss).backward()
    want = (loss.detach(), s.grad, w.grad)
    for name, a, b in zip(("loss", "grad_student", "grad_weight"), got, want):
        if mask_kind == "nothing":
            assert a.abs().max() == 0, f"{name} must be exactly 0 when no row is selected"
        else:
            assert_rel_close(a, b, 1e-10, name)


@pytest.mark.parametrize("mask_kind", ["all", "some"])
def test_torch_backend_gradcheck(mask_kind):
    """float64 gradcheck. The weight gets the student path's gradient only, while finite differences of W also
    move the teacher logits: so the check with W trainable uses a zero teacher (a uniform target whatever W is)."""
    student, teacher, weight = make_linear_kl_inputs(4, 3, 5, dtype=torch.float64)
    mask = _make_mask(mask_kind, 4, "cpu")
    def loss(s, t, w):
        return linear_kl_loss(s, t, w, mask=mask, temperature=1.5, chunk_size=3, backend="torch")
    s = student.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, weight.detach()), (s,))
    zero_teacher = torch.zeros_like(teacher)
    assert torch.autograd.gradcheck(lambda s, w: loss(s, zero_teacher, w), (s, weight.detach().requires_grad_()))


class _LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor a torch op returns (bytes, not elements: the Triton
    interpreter copies its arguments' storages as uint8 tensors)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out



def test_numpy_chunk_size_is_an_int():
    import numpy as np

    student, teacher, weight = make_linear_kl_inputs(5, 8, 7)
    torch.testing.assert_close(linear_kl_loss(student, teacher, weight, chunk_size=np.int64(2)),
                               linear_kl_loss(student, teacher, weight, chunk_size=2), rtol=0, atol=0)

@pytest.mark.parametrize("backend", BACKENDS)
def test_never_holds_full_logits_and_chunks_agree(backend, device):
    """With chunk_size=2 no tensor reaches `N x V` elements, and the results equal those of one chunk."""
    N, H, V = 40, 8, 300                      # N * V = 12000 > V * H = 2400 (the weight grad)
    student, teacher, weight = make_linear_kl_inputs(N, H, V, device=device)
    with _LargestTensor() as seen:
        small = _run(student, teacher, weight, chunk_size=2, backend=backend)
    full = N * V * student.element_size()
    assert seen.largest < full / 4, f"a tensor of {seen.largest} bytes (N x V logits: {full})"
    whole = _run(student, teacher, weight, chunk_size=N, backend=backend)
    for name, a, b in zip(("loss", "grad_student", "grad_weight"), small, whole):
        assert_rel_close(a, b, 1e-5, name)


# ---------------------------------------------------------------- argument errors


def _bad_inputs_cases():
    s, t, w = make_linear_kl_inputs(5, 4, 7)
    return [
        ("rank", dict(student_hidden=s[None]), ValueError, "student_hidden must have 2 dims"),
        ("teacher shape", dict(teacher_hidden=t[:4]), ValueError, "teacher_hidden must have the shape"),
        ("weight hidden", dict(weight=w[:, :3]), ValueError, "hidden size"),
        ("dtype", dict(teacher_hidden=t.double()), TypeError, "must match"),
        ("mask dtype", dict(mask=torch.ones(5, dtype=torch.int64)), TypeError, "mask must be"),
        ("mask length", dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask must have length"),
        ("empty N", dict(student_hidden=s[:0], teacher_hidden=t[:0]), ValueError, "is empty"),
        ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
        ("temperature <0", dict(temperature=-1.0), ValueError, "temperature"),
        ("chunk 0", dict(chunk_size=0), ValueError, "chunk_size"),
        ("chunk float", dict(chunk_size=2.0), TypeError, "chunk_size must be an int, got float"),
        ("chunk bool", dict(chunk_size=True), TypeError, "chunk_size must be an int, got bool"),
        ("unknown backend", dict(backend="numpy"), ValueError, "backend must be one of"),
        ("no cuda backend", dict(backend="cuda"), ValueError, "backend must be one of"),
    ], (s, t, w)


_CASES, _GOOD = _bad_inputs_cases()


@pytest.mark.parametrize("name, change, exc, match", _CASES, ids=[c[0] for c in _CASES])
def test_bad_inputs_raise(name, change, exc, match):
    s, t, w = _GOOD
    args = dict(student_hidden=s, teacher_hidden=t, weight=w)
    args.update(change)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("student_hidden", "teacher_hidden", "weight")}
    with pytest.raises(exc, match=match):
        linear_kl_loss(args["student_hidden"], args["teacher_hidden"], args["weight"], **kwargs)


# ---------------------------------------------------------------- every backend vs the float64 torch backend


def _check_backend(backend, V, N, mask_kind, temperature, weight_trainable, dtype, chunk_size, device, H=16):
    student, teacher, weight = make_linear_kl_inputs(N, H, V, dtype=dtype, device=device,
                                                     weight_requires_grad=weight_trainable)
    kwargs = dict(mask=_make_mask(mask_kind, N, device), temperature=temperature, chunk_size=chunk_size)
    got = _run(student, teacher, weight, backend=backend, **kwargs)
    ref = _float64(student, teacher, weight, **kwargs)
    if dtype == torch.float32 or backend == "torch":
        tols = [None] * 3   # the dtype's budget (tests.utils / testing.REL_TOL)
    else:
        # The torch backend computes in fp32 from the rounded inputs; the Triton one also rounds the logits
        # gradient to the input dtype (a tensor-core operand): a few units of roundoff more.
        torch_out = _run(student, teacher, weight, backend="torch", **kwargs)
        tols = [4 * rel_err(a, b) + 4 * BF16_UNIT if b is not None else None for a, b in zip(torch_out, ref)]
    names = ("loss", "grad_student", "grad_weight")
    for name, a, b, tol in zip(names, got, ref, tols):
        if b is None:
            assert a is None, f"{name}: gradient where none was asked for"
            continue
        want = dtype if name != "loss" or dtype == torch.float64 else torch.float32  # the loss is not rounded
        assert a.dtype == want, f"{name}: dtype {a.dtype}, expected {want}"
        if mask_kind == "nothing":
            assert a.abs().max() == 0, f"{name} must be exactly 0 when no row is selected"
        else:
            assert_rel_close(a, b, tol, name)


# The default CPU set: each size, mask, temperature, weight mode, dtype and a chunk not dividing N at least once.
_FAST = [
    # V, N, mask, T, weight trainable, dtype, chunk
    (7, 1, "all", 1.0, True, torch.float32, 4),
    (7, 5, "some", 2.0, False, torch.float32, 2),
    (1000, 5, "nothing", 1.0, True, torch.float32, 3),
    (1031, 70, "some", 2.0, True, torch.float32, 16),
    (1031, 70, "all", 1.0, False, torch.bfloat16, 32),
    (1000, 5, "some", 2.0, True, torch.bfloat16, 2),
]
_SLOW = [c for c in itertools.product([7, 1000, 1031], [1, 5, 70], ["all", "some", "nothing"], [1.0, 2.0],
                                      [True, False], [torch.float32, torch.bfloat16], [3])
         if c not in _FAST]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, N, mask_kind, temperature, weight_trainable, dtype, chunk_size", _FAST)
def test_backend_matches_float64(backend, V, N, mask_kind, temperature, weight_trainable, dtype, chunk_size, device):
    _check_backend(backend, V, N, mask_kind, temperature, weight_trainable, dtype, chunk_size, device)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, N, mask_kind, temperature, weight_trainable, dtype, chunk_size", _SLOW)
def test_backend_matches_float64_full(backend, V, N, mask_kind, temperature, weight_trainable, dtype, chunk_size,
                                      device):
    _check_backend(backend, V, N, mask_kind, temperature, weight_trainable, dtype, chunk_size, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_teacher_close_to_student(backend, device):
    """Late distillation: teacher ~ student (noise 0.05) and peaked logits (std 8). p_s - p_t is then small, so
    the logits must stay fp32: bf16 logits (0.03 of rounding each) gave 10% loss and 20% gradient errors."""
    student, teacher, weight = make_linear_kl_inputs(64, 64, 1031, dtype=torch.bfloat16, device=device,
                                                     teacher_noise=0.05, logit_std=8.0)
    got = _run(student, teacher, weight, backend=backend, chunk_size=16)
    ref = _float64(student, teacher, weight, chunk_size=16)
    for name, a, b in zip(("loss", "grad_student", "grad_weight"), got, ref):
        assert_rel_close(a, b, 0.02, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_gradients_of_many_rows_keep_their_precision(backend, device):
    """fp16 training: the mean over n rows puts the logits gradient (p_s - p_t) / (T n) under fp16's normal range at
    n in the thousands, where it lost its precision or flushed to zero (here 5% error on Triton, 0.13% on torch;
    more at larger n and V). Computed in forward, the gradients stay fp32 until backward, where the loss scale (2^16
    here, arriving with the incoming gradient) multiplies them: then fp16's own rounding is the error left."""
    student, teacher, weight = make_linear_kl_inputs(1024, 32, 4000, dtype=torch.float16, device=device,
                                                     teacher_noise=0.1)
    scale = 2.0 ** 16
    s, w = student.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    (scale * linear_kl_loss(s, teacher, w, chunk_size=256, backend=backend)).backward()
    _, ref_student, ref_weight = _float64(student, teacher, weight, chunk_size=256)
    for name, got, ref in (("grad_student", s.grad, ref_student), ("grad_weight", w.grad, ref_weight)):
        assert got.dtype == torch.float16
        # the reference had UPSTREAM; the budget is under 2 units of fp16 roundoff (4.9e-4)
        assert_rel_close(got.double() * (UPSTREAM / scale), ref, 8e-4, name)


@needs_triton
def test_triton_no_grad_forward_only(device):
    """Under no_grad the kernel skips its gradient pass and the loss is unchanged."""
    student, teacher, weight = make_linear_kl_inputs(9, 16, 1031, device=device)
    with torch.no_grad():
        loss = linear_kl_loss(student, teacher, weight, chunk_size=4, backend="triton")
    ref = _float64(student, teacher, weight, chunk_size=4)[0]
    assert not loss.requires_grad
    assert_rel_close(loss, ref)


@needs_triton
def test_triton_kernel_writes_every_element():
    """The kernel on NaN-poisoned outputs: every per-row KL and every gradient element gets written."""
    from llm2comp_kernels.linear_kl_loss.triton import _kl_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    C, V, T, scale = 6, 1031, 2.0, 0.125
    zs, zt = (3 * torch.randn(C, V, generator=g)).to(device), (3 * torch.randn(C, V, generator=g)).to(device)
    log_ps, log_pt = torch.log_softmax(zs.double() / T, -1), torch.log_softmax(zt.double() / T, -1)
    kl = torch.full((C,), float("nan"), device=device)
    buf = zs.clone()
    _kl_rows(buf, zt, kl, T, scale, True)
    assert_rel_close(kl, (log_pt.exp() * (log_pt - log_ps)).sum(-1), name="kl")
    assert_rel_close(buf, (log_ps.exp() - log_pt.exp()) * scale, name="logits gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_realistic_size(backend, dtype):
    """Distillation-sized rows (V = 32003, odd), with a mask and temperature 2, vs float64 on the GPU."""
    _check_backend(backend, 32003, 1000, "some", 2.0, True, dtype, 257, "cuda", H=1024)
