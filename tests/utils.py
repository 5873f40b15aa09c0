"""Comparison helpers shared by the kernel tests."""

from __future__ import annotations

import torch

from llm2comp_kernels.testing import REL_TOL, rel_err


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float | None = None, name: str = "output") -> None:
    """Assert ``||out - ref|| / ||ref|| <= tol`` (default: the budget for out's dtype), no NaN/inf.

    On failure, report the error, the tolerance and the first mismatching elements.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    tol = REL_TOL[out.dtype] if tol is None else tol
    assert torch.isfinite(out).all(), f"{name}: contains NaN or inf"
    err = rel_err(out, ref)
    if err > tol:
        diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().flatten()
        worst = diff.topk(min(5, diff.numel())).indices.tolist()
        flat_out, flat_ref = out.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
        items = ", ".join(f"[{i}] {flat_out[i]:.6g} vs {flat_ref[i]:.6g}" for i in worst)
        raise AssertionError(f"{name}: relative error {err:.3e} > tol {tol:.1e}; worst: {items}")


def backend_cases(cuda_op: str | None, backends=("torch", "triton", "cuda")):
    """pytest params for the backends, each skipped with the reason it cannot run here.

    `cuda_op` names the extension op behind the op's cuda backend (None if it has none).
    """
    import pytest

    from llm2comp_kernels._backends import why_not

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = []
    for b in backends:
        reason = why_not(b, device, torch.float32, cuda_op)
        cases.append(pytest.param(b, id=b, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return cases
