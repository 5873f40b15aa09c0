"""What the Triton backends share: the tensor-core product of the kernels (and when it must multiply fp32 copies
instead), and a launcher that keeps the autotuner off the hot path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backends import triton_interpret


@triton.jit
def dot(a, b, UPCAST: tl.constexpr):
    """fp32-accumulated ``a @ b``. float32 operands use IEEE fp32 products (as torch does by default; TF32
    would cost ~1e-3 relative error). UPCAST (see `dot_upcast`) multiplies fp32 copies, since the triton 3.9
    interpreter computes bfloat16 dots wrongly; products of bf16 values are exact in fp32, so this matches the
    tensor-core result up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


def dot_upcast(dtype: torch.dtype) -> bool:
    """The UPCAST flag of `dot` for operands of `dtype`: on the CPU interpreter with bfloat16 only."""
    return triton_interpret() and dtype == torch.bfloat16


class TunedLauncher:
    """Launches an autotuned kernel through `triton.autotune` the first time it meets a tuning key, and afterwards
    straight with the config the tuner chose for that key: the same launch, without the autotuner's per-call
    Python (dicts of all 28 arguments of the attention forward, its key looked up among them), which a model
    pays once per layer per forward. `benchmarks/profile_ops.py` times the host side of that forward (its
    ``launch`` group) on a GPU.

    `key` must hold what the autotuner's key holds (its key arguments and the tensors' dtypes), or a config tuned
    for other inputs would be reused. `grid(meta)` gives the launch grid from a config's meta-parameters.
    """

    def __init__(self, kernel, tuned):
        self.kernel, self.tuned = kernel, tuned
        self.best: dict[tuple, triton.Config] = {}
        self.last: triton.Config | None = None  # the config of the latest launch

    def __call__(self, key: tuple, grid, *args, **constexprs) -> None:
        config = self.best.get(key)
        if config is None:
            self.tuned[grid](*args, **constexprs)
            config = self.best[key] = self.tuned.best_config
        else:
            meta = config.all_kwargs()
            self.kernel[grid(meta)](*args, **constexprs, **meta)
        self.last = config
