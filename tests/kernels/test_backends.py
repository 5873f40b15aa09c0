"""`resolve_backend`: the requested backend or an error that says why not; for "auto", the op's own order."""

import pytest
import torch

from llm2comp_kernels import _backends


@pytest.mark.parametrize("order, runnable, expected", [
    (("triton", "cuda"), {"triton", "cuda"}, "triton"),
    (("triton", "cuda"), {"cuda"}, "cuda"),
    (("cuda", "triton"), {"triton", "cuda"}, "cuda"),
    (("cuda", "triton"), {"triton"}, "triton"),
    (("cuda", "triton"), set(), "torch"),
])
def test_auto_takes_the_first_runnable_backend_of_the_op_order(monkeypatch, order, runnable, expected):
    monkeypatch.setattr(_backends, "why_not", lambda backend, *args: None if backend in runnable else "cannot")
    chosen = _backends.resolve_backend("op", "auto", torch.device("cuda"), torch.bfloat16, auto_order=order)
    assert chosen == expected


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


def test_attention_auto_order_puts_cuda_first_only_for_a_short_forward_without_grad():
    from llm2comp_kernels.memory_attention.api import AUTO_ORDER, SHORT_FORWARD_MAX_L, SHORT_FORWARD_ORDER, auto_order

    def inputs(L, requires_grad=False):
        return [torch.zeros(1, 2, L, 8, requires_grad=requires_grad) for _ in range(3)]

    assert auto_order(*inputs(SHORT_FORWARD_MAX_L)) == SHORT_FORWARD_ORDER == ("cuda", "triton")
    assert auto_order(*inputs(SHORT_FORWARD_MAX_L + 1)) == AUTO_ORDER == ("triton", "cuda")
    assert auto_order(*inputs(1, requires_grad=True)) == AUTO_ORDER
    with torch.no_grad():
        assert auto_order(*inputs(1, requires_grad=True)) == SHORT_FORWARD_ORDER
