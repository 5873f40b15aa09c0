"""`resolve_backend`: the requested backend or an error that says why not; for "auto", the op's own order."""

import warnings

import pytest
import torch

import llm2comp_kernels
from llm2comp_kernels import _backends
from llm2comp_kernels.memory_attention import api as attention_api


@pytest.mark.parametrize("order, runnable, expected", [
    (("triton", "cuda"), {"triton", "cuda"}, "triton"),
    (("triton", "cuda"), {"cuda"}, "cuda"),
    (("cuda", "triton"), {"triton", "cuda"}, "cuda"),
    (("cuda", "triton"), {"triton"}, "triton"),
    (("cuda", "triton"), set(), "torch"),
])
def test_auto_takes_the_first_runnable_backend_of_the_op_order(monkeypatch, order, runnable, expected):
    monkeypatch.setattr(_backends, "why_not", lambda backend, *args: None if backend in runnable else "cannot")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = _backends.resolve_backend("op", "auto", torch.device("cuda"), torch.bfloat16, auto_order=order)
    assert chosen == expected
    # falling back to the O(L^2) reference on a GPU is said, with each kernel's reason
    assert [str(w.message) for w in caught] == (
        ["op: backend='auto' runs the torch reference on these CUDA tensors: cuda: cannot; triton: cannot"]
        if expected == "torch" else [])


def test_auto_on_cpu_tensors_is_torch(monkeypatch):
    monkeypatch.setattr(_backends, "why_not", lambda *args: None)   # even were every kernel runnable
    assert _backends.resolve_backend("op", "auto", torch.device("cpu"), torch.float32,
                                     auto_order=("cuda", "triton")) == "torch"


def test_requested_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setattr(_backends, "why_not", lambda backend, *args: f"{backend} is missing")
    with pytest.raises(RuntimeError, match=r"op: backend='cuda' cannot run here: cuda is missing"):
        _backends.resolve_backend("op", "cuda", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="backend must be one of"):
        _backends.resolve_backend("op", "flash", torch.device("cuda"), torch.bfloat16)


def test_attention_auto_runs_sdpa_where_no_kernel_runs(monkeypatch):
    """CPU tensors, or a GPU that no kernel backend takes (old, or a head dim none has): torch's fused SDPA,
    not the eager reference."""
    from llm2comp_kernels.memory_attention import sdpa

    calls = []
    real = sdpa.memory_attention_sdpa
    monkeypatch.setattr(sdpa, "memory_attention_sdpa", lambda *args: calls.append(1) or real(*args))
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    out = llm2comp_kernels.memory_attention(q, k, v, torch.tensor([5, 2]))
    assert calls == [1] and (out[1, :, 2:] == 0).all()
    monkeypatch.setattr(_backends, "why_not", lambda backend, *args: None if backend in ("torch", "sdpa") else "no")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = _backends.resolve_backend("memory_attention", "auto", torch.device("cuda"), torch.float16,
                                           allowed=attention_api.BACKENDS, auto_order=("triton",), fallback="sdpa")
    assert chosen == "sdpa"
    assert [str(w.message) for w in caught] == [
        "memory_attention: backend='auto' runs the sdpa backend on these CUDA tensors: triton: no"]


def test_attention_auto_order_puts_cuda_first_only_for_a_short_forward_without_grad():
    from llm2comp_kernels.memory_attention.api import AUTO_ORDER, SHORT_FORWARD_MAX_L, SHORT_FORWARD_ORDER, auto_order

    def inputs(L, requires_grad=False):
        return [torch.zeros(1, 2, L, 8, requires_grad=requires_grad) for _ in range(3)]

    assert auto_order(*inputs(SHORT_FORWARD_MAX_L)) == SHORT_FORWARD_ORDER == ("cuda", "triton")
    assert auto_order(*inputs(SHORT_FORWARD_MAX_L + 1)) == AUTO_ORDER == ("triton", "cuda")
    assert auto_order(*inputs(1, requires_grad=True)) == AUTO_ORDER
    with torch.no_grad():
        assert auto_order(*inputs(1, requires_grad=True)) == SHORT_FORWARD_ORDER


def _attention_inputs(B=1, d=16, dtype=torch.bfloat16, requires_grad=False):
    return [torch.zeros(B, 2, 4, d, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


@pytest.mark.parametrize("inputs, backend, reason", [
    (_attention_inputs(d=24), "triton", "head dims .* got 24"),
    (_attention_inputs(B=65536), "triton", "at most 65535 batch rows"),
    (_attention_inputs(d=64, dtype=torch.float32), "cuda", "float16/bfloat16 with head dims"),
    (_attention_inputs(dtype=torch.float32), "flash", "float16/bfloat16 with head dims up to 256"),
    (_attention_inputs(d=288), "flash", "up to 256, got torch.bfloat16 with d=288"),
])
def test_attention_backends_say_which_inputs_they_refuse(inputs, backend, reason):
    import re

    assert re.search(reason, attention_api._unsupported(*inputs, 0.0)[backend])


def test_cuda_attention_with_gradients_needs_triton(monkeypatch):
    monkeypatch.setattr(attention_api, "triton_import_error", lambda: "triton is not importable (ImportError)")
    assert "cuda" not in attention_api._unsupported(*_attention_inputs(d=64), 0.0)  # a forward alone runs without it
    reason = attention_api._unsupported(*_attention_inputs(d=64, requires_grad=True), 0.0)["cuda"]
    assert reason == "its backward runs the Triton kernels, and triton is not importable (ImportError)"


def test_available_backends(monkeypatch):
    monkeypatch.setattr(_backends, "why_not", lambda backend, device, dtype, cuda_op, unsupported=None:
                        (unsupported or {}).get(backend))   # every backend runs but for the dtype limits
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fp32 = llm2comp_kernels.available_backends("cuda")
    assert fp32["memory_attention"] == ["torch", "sdpa", "triton"] and fp32["linear_kl_loss"] == ["torch", "triton"]
    bf16 = llm2comp_kernels.available_backends("cuda", torch.bfloat16)
    assert bf16["memory_attention"] == ["torch", "sdpa", "triton", "cuda", "flash"]
    assert bf16["contrastive_loss"] == ["torch", "triton", "cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        llm2comp_kernels.available_backends("cuda")
    with pytest.raises(ValueError, match="not a device: 'tpu'"):
        llm2comp_kernels.available_backends("tpu")


@pytest.mark.parametrize("capability, refused", [((7, 5), True), ((7, 0), True), ((8, 0), False), ((9, 0), False)])
def test_kernels_refuse_gpus_older_than_ampere(monkeypatch, capability, refused):
    """A T4 or V100 has no bf16 tensor cores, cp.async or ldmatrix: the kernels say so, auto runs torch."""
    monkeypatch.setattr(_backends, "compute_capability", lambda device: capability)
    monkeypatch.setattr(_backends, "triton_import_error", lambda: None)
    monkeypatch.setattr(_backends, "cuda_extension", lambda: object())
    monkeypatch.setattr(_backends, "cuda_extension_ops", lambda: frozenset({"op_fwd"}))
    monkeypatch.setattr(_backends, "flash_attn_error", lambda: None)
    gpu = torch.device("cuda", 0)
    expected = f"the GPU has compute capability {capability[0]}.{capability[1]}; the kernels need 8.0 or newer"
    for backend in ("triton", "cuda", "flash"):
        reason = _backends.why_not(backend, gpu, torch.float16, "op_fwd")
        assert (reason is not None and reason.startswith(expected)) if refused else reason is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = _backends.resolve_backend("op", "auto", gpu, torch.float16, cuda_op="op_fwd",
                                           auto_order=("cuda", "triton"))
    assert chosen == ("torch" if refused else "cuda") and len(caught) == int(refused)
