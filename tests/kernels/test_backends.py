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
