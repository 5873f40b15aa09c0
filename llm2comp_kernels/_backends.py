"""Backend discovery and resolution shared by every op.

`resolve_backend` turns the user's ``backend=`` argument into the backend that will run, or
raises a ValueError/RuntimeError that says why the requested one cannot run here.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

PURE_TORCH = ("torch", "sdpa")  # backends written in PyTorch ops alone: they run on any device and dtype
_LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)  # the Triton and CUDA kernels: bf16 tensor cores, cp.async, ldmatrix (Ampere and newer)


def compute_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of the CUDA device `device`."""
    return torch.cuda.get_device_capability(device)


def old_gpu(device: torch.device) -> str | None:
    """Why the GPU `device` is too old for the Triton and CUDA kernels, or None (also for CPU devices)."""
    if device.type != "cuda" or compute_capability(device) >= MIN_CAPABILITY:
        return None
    major, minor = compute_capability(device)
    return (f"the GPU has compute capability {major}.{minor}; the kernels need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere, Ada, Hopper, Blackwell)")


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_autotune() -> bool:
    """Whether Triton launchers autotune their block sizes: on a GPU unless ``LLM2COMP_TRITON_AUTOTUNE=0``.

    Under the interpreter a fixed, documented config is used (timing numpy would tune nothing).
    """
    return not triton_interpret() and os.environ.get("LLM2COMP_TRITON_AUTOTUNE", "1") != "0"


@functools.cache
def triton_import_error() -> str | None:
    """None if triton imports, else the reason it does not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({exc.__class__.__name__}: {exc})"
    return None


@functools.cache
def cuda_extension():
    """The compiled `llm2comp_kernels._C` module, or None if it was not built."""
    try:
        return importlib.import_module("llm2comp_kernels._C")
    except ImportError:
        return None


@functools.cache
def cuda_extension_ops() -> frozenset[str]:
    """Names of the ops the compiled extension registered (empty when not built)."""
    if cuda_extension() is None:
        return frozenset()
    # dir(torch.ops.llm2comp) lists only ops already looked up (torch resolves them lazily): ask the dispatcher,
    # once (listing every op name takes milliseconds; the set is fixed once the extension is loaded).
    return frozenset(name.split("::", 1)[1].split(".", 1)[0] for name in torch._C._dispatch_get_all_op_names()
                     if name.startswith("llm2comp::"))


@functools.cache
def flash_attn_error() -> str | None:
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:
        return f"flash_attn is not importable ({exc.__class__.__name__})"
    return None


def why_not(backend: str, device: torch.device, dtype: torch.dtype, cuda_op: str | None,
            unsupported: dict[str, str] | None = None) -> str | None:
    """Reason `backend` cannot run on tensors of `device`/`dtype`, or None if it can.

    `cuda_op` names the extension op backing the ``cuda`` backend (None: the op has no CUDA
    kernel). `unsupported` maps a backend to an input-specific reason computed by the op
    (for example a head dim the CUDA kernel was not instantiated for).
    """
    if unsupported and backend in unsupported:
        return unsupported[backend]
    if backend in PURE_TORCH:
        return None
    if dtype not in KERNEL_DTYPES:
        return f"the {backend} backend supports float32/float16/bfloat16, got {dtype} (use backend='torch')"
    if backend == "triton":
        if (err := triton_import_error()) is not None:
            return err
        if device.type != "cuda" and not triton_interpret():
            return (f"Triton kernels need CUDA tensors (got {device.type}); "
                    "set TRITON_INTERPRET=1 to run them on the CPU interpreter")
        return old_gpu(device)
    if backend == "cuda":
        if cuda_op is None:
            return "this op has no CUDA C++ kernel (use 'triton' or 'torch')"
        if cuda_extension() is None:
            return ("the CUDA extension llm2comp_kernels._C was not built "
                    "(reinstall with CUDA torch and nvcc: pip install --no-build-isolation -e .)")
        if cuda_op not in cuda_extension_ops():
            return f"the CUDA extension has no op {cuda_op!r}"
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got {device.type}"
        return old_gpu(device)
    if backend == "flash":
        return flash_attn_error() or ("flash_attn needs CUDA tensors" if device.type != "cuda" else old_gpu(device))
    return f"unknown backend {backend!r}"


def resolve_backend(op: str, backend: str, device: torch.device, dtype: torch.dtype, *,
                    cuda_op: str | None = None, allowed: tuple[str, ...] = ("torch", "triton", "cuda"),
                    unsupported: dict[str, str] | None = None, auto_order: tuple[str, ...] = ("triton",),
                    fallback: str = "torch") -> str:
    """The backend that runs `op`: the requested one, or for ``"auto"`` on CUDA tensors the first of
    `auto_order` (each op's, by what measured fastest) that can run, else `fallback` (a pure-PyTorch backend).

    ``"auto"`` never picks Triton for CPU tensors, even under the interpreter (it is a test tool).
    """
    if not isinstance(backend, str) or backend not in ("auto",) + allowed:
        raise ValueError(f"{op}: backend must be one of {('auto',) + allowed}, got {backend!r}")
    if backend != "auto":
        reason = why_not(backend, device, dtype, cuda_op, unsupported)
        if reason is not None:
            raise RuntimeError(f"{op}: backend={backend!r} cannot run here: {reason}")
        return backend
    if device.type == "cuda":
        reasons = {}
        for candidate in auto_order:
            if candidate in allowed:
                reason = why_not(candidate, device, dtype, cuda_op, unsupported)
                if reason is None:
                    return candidate
                reasons[candidate] = reason
        if reasons:  # shown once per distinct message (Python's default warning filter)
            what = "the torch reference" if fallback == "torch" else f"the {fallback} backend"
            warnings.warn(f"{op}: backend='auto' runs {what} on these CUDA tensors: "
                          + "; ".join(f"{b}: {r}" for b, r in reasons.items()), stacklevel=3)
    return fallback


def available_for(device: torch.device, dtype: torch.dtype, cuda_op: str | None, allowed: tuple[str, ...],
                  unsupported: dict[str, str] | None = None) -> list[str]:
    """Backends usable for `dtype` tensors on `device`."""
    return [b for b in allowed if why_not(b, device, dtype, cuda_op, unsupported) is None]
