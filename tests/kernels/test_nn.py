"""The nn.Module wrappers: options reach the ops, bad options fail at construction, pickling,
printing, and torch.compile(fullgraph=True) on the torch backend."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import llm2comp_kernels as K
from llm2comp_kernels.nn import ContrastiveLoss, LinearKLLoss, MemoryAttention, SpanMeanPool


def _inputs(name: str, seed: int = 0):
    """(tensor args, indices of the args that take gradients) for each module, odd sizes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    if name == "attention":
        return (r(3, 4, 7, 16), r(3, 2, 7, 16), r(3, 2, 7, 16), torch.tensor([7, 2, 5])), (0, 1, 2)
    if name == "pool":
        return (r(3, 9, 5), torch.tensor([0, 4, 2]), torch.tensor([9, 3, 1])), (0,)
    if name == "contrastive":
        return (r(5, 11), r(13, 11), torch.tensor([0, 12, 3, 3, 7])), (0, 1)
    return (r(7, 6), r(7, 6), r(19, 6), torch.tensor([True, False, True, True, False, True, True])), (0, 2)


# (name, module with non-default options, the same call through the functional op): every option
# set here changes the result, so a module that dropped one would not match.
CASES = [
    ("attention", lambda: MemoryAttention(causal=True, scale=0.3, backend="torch"),
     lambda q, k, v, s: K.memory_attention(q, k, v, s, causal=True, scale=0.3, backend="torch")),
    ("pool", lambda: SpanMeanPool(backend="torch"),
     lambda h, s, n: K.span_mean_pool(h, s, n, backend="torch")),
    ("contrastive", lambda: ContrastiveLoss(temperature=0.1, normalize=False, symmetric=True, reduction="none",
                                            backend="torch"),
     lambda q, d, y: K.contrastive_loss(q, d, labels=y, temperature=0.1, normalize=False, symmetric=True,
                                        reduction="none", backend="torch")),
    ("kl", lambda: LinearKLLoss(temperature=2.0, chunk_size=3, backend="torch"),
     lambda s, t, w, m: K.linear_kl_loss(s, t, w, mask=m, temperature=2.0, chunk_size=3, backend="torch")),
]
IDS = [c[0] for c in CASES]


def _run(fn, args, grad_idx):
    """fn's output and the gradients of the float args, under a non-unit upstream gradient."""
    args = [a.detach().clone().requires_grad_(i in grad_idx) for i, a in enumerate(args)]
    out = fn(*args)
    upstream = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, [args[i] for i in grad_idx], upstream)
    return out.detach(), grads


@pytest.mark.parametrize("name, make, functional", CASES, ids=IDS)
def test_module_matches_functional(name, make, functional):
    args, grad_idx = _inputs(name)
    out, grads = _run(make(), args, grad_idx)
    ref_out, ref_grads = _run(functional, args, grad_idx)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name, make", [
    ("attention", lambda: MemoryAttention(backend="cuda")),
    ("pool", lambda: SpanMeanPool(backend="cuda")),
    ("contrastive", lambda: ContrastiveLoss(backend="cuda")),
    ("kl", lambda: LinearKLLoss(backend="triton")),
], ids=IDS)
def test_backend_reaches_the_op(name, make, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a backend that cannot run here, which the op must refuse")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # so Triton, too, refuses CPU tensors
    module = make()
    args, _ = _inputs(name)
    args = tuple(a.float() if a.is_floating_point() else a for a in args)
    with pytest.raises(RuntimeError, match=f"backend='{module.backend}' cannot run here"):
        module(*args)


@pytest.mark.parametrize("make, error, match", [
    (lambda: MemoryAttention(causal=1), TypeError, "causal must be a bool"),
    (lambda: MemoryAttention(scale=0.0), ValueError, "scale must be a finite number > 0"),
    (lambda: MemoryAttention(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    (lambda: MemoryAttention(dropout="0.1"), TypeError, "dropout must be a number"),
    (lambda: MemoryAttention(backend="fast"), ValueError, "backend must be one of"),
    (lambda: SpanMeanPool(backend="flash"), ValueError, "backend must be one of"),
    (lambda: ContrastiveLoss(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
    (lambda: ContrastiveLoss(symmetric="yes"), TypeError, "symmetric must be a bool"),
    (lambda: ContrastiveLoss(reduction="max"), ValueError, "reduction must be one of"),
    (lambda: ContrastiveLoss(backend="flash"), ValueError, "backend must be one of"),
    (lambda: LinearKLLoss(chunk_size=0), ValueError, "^LinearKLLoss: chunk_size must be an int >= 1"),
    (lambda: LinearKLLoss(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_options_fail_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("name, make, functional", CASES, ids=IDS)
def test_pickle_and_repr(name, make, functional):
    module = make()
    text = repr(module)
    for key, value in vars(module).items():
        if not key.startswith("_") and key != "training":
            assert f"{key}={value!r}" in text, f"{key}={value!r} missing from {text}"
    args, _ = _inputs(name)
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert repr(clone) == text
        torch.testing.assert_close(clone(*args), module(*args), rtol=0, atol=0)


@pytest.mark.parametrize("name, make, functional", CASES, ids=IDS)
def test_compiles_without_graph_breaks(name, make, functional):
    # LinearKLLoss with a mask keeps a data-dependent number of rows, which Dynamo cannot keep in
    # one graph (see the module docstring); here it runs on all rows, the masked case below.
    args, grad_idx = _inputs(name)
    if name == "kl":
        args = args[:3]
    torch._dynamo.reset()
    compiled = torch.compile(make(), fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, args, grad_idx)
    ref_out, ref_grads = _run(make(), args, grad_idx)
    torch.testing.assert_close(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref)


def test_compiled_linear_kl_loss_with_mask():
    args, grad_idx = _inputs("kl")
    torch._dynamo.reset()
    out, grads = _run(torch.compile(LinearKLLoss(chunk_size=2), backend="aot_eager"), args, grad_idx)
    ref_out, ref_grads = _run(LinearKLLoss(chunk_size=2), args, grad_idx)
    torch.testing.assert_close(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref)


def test_eager_calls_still_check_index_values():
    # Value checks are skipped only while torch.compile traces (llm2comp_kernels/_validation.py).
    hidden, start, _ = _inputs("pool")[0]
    with pytest.raises(ValueError, match=r"length\[1\] = 9 breaks"):
        SpanMeanPool()(hidden, start, torch.tensor([1, 9, 1]))
