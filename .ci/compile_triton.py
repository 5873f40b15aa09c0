"""Compile every Triton kernel for real GPUs (sm_80, sm_90) on a machine without one.

The CPU interpreter (TRITON_INTERPRET=1) runs the kernels' arithmetic but not Triton's compiler: a kernel can
pass every interpreter test and still fail to compile, or need more shared memory than a GPU has. This script
runs each op's Triton entry point (forward and backward; attention with and without dropout) on small CPU
tensors with the GPU code path, records every launch instead of running it, then compiles each launch ahead of
time for each target with every autotune config the launch could pick, and prints registers, spills and shared
memory per kernel.

Fails (exit 1) when a kernel does not compile, when no config of a launch fits the target's shared memory, or
when no config of a bfloat16/float16 launch runs without spilling registers (for an autotuned launch: none of
its configs; the tuner times each one, so a spilling config may stay in the list and simply lose). float32
launches (IEEE fp32 products, no tensor cores: a correctness path, not a fast one) may spill.

    python .ci/compile_triton.py [--arch 80 90] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the GPU code path: autotuned launches, tensor-core dots
os.environ["LLM2COMP_TRITON_AUTOTUNE"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a kernel launch gets by default (triton <= 3.9)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from llm2comp_kernels.contrastive_loss.triton import contrastive_loss_triton  # noqa: E402
from llm2comp_kernels.linear_kl_loss.triton import linear_kl_loss_triton  # noqa: E402
from llm2comp_kernels.memory_attention.triton import (  # noqa: E402
    draw_philox,
    dropout_keep_mask,
    memory_attention_triton,
)
from llm2comp_kernels.span_mean_pool.triton import span_mean_pool_triton  # noqa: E402

# Shared memory a block may use (opt-in maximum), bytes.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class Launch:
    """One recorded kernel launch: the kernel, its arguments, and the autotuner that would pick its config."""

    def __init__(self, fn: JITFunction, args: tuple, kwargs: dict, tuner: Autotuner | None):
        self.fn, self.args, self.kwargs, self.tuner = fn, args, kwargs, tuner

    def configs(self) -> list[dict]:
        """The keyword arguments of each config this launch can run with (one when not autotuned)."""
        if self.tuner is None:
            return [self.kwargs]
        configs = self.tuner.configs
        if self.tuner.early_config_prune is not None:
            named = dict(zip(self.fn.arg_names, self.args))
            configs = self.tuner.early_config_prune(configs, named, **self.kwargs)
        return [{**self.kwargs, **c.all_kwargs()} for c in configs]

    def specialize(self, target: GPUTarget, kwargs: dict):
        """(options, signature, constexprs, attrs) exactly as the JIT derives them for `target`: integer
        arguments equal to 1 become constants, multiples of 16 and aligned pointers get divisibility hints."""
        backend = make_backend(target)
        binder = create_function_from_signature(self.fn.signature, self.fn.params, backend)
        bound, specialization, options = binder(*self.args, **kwargs)
        return self.fn._pack_args(backend, kwargs, bound, specialization, options)

    def low_precision(self) -> bool:
        return any(isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) for a in self.args)

    def describe(self) -> str:
        dtypes = sorted({str(a.dtype).replace("torch.", "") for a in self.args if isinstance(a, torch.Tensor)})
        consts = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if k not in LAUNCH_OPTIONS)
        return f"{self.fn.__name__} [{'/'.join(dtypes)}] {consts}"


def _signature_key(launch: Launch) -> tuple:
    """Launches that compile to the same kernels: same tensor dtypes and the same constexprs."""
    args = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in launch.args)
    return launch.fn.__name__, args, tuple(sorted(launch.kwargs.items()))


def record_launches(exercise) -> list[Launch]:
    """Run `exercise()` with every Triton launch recorded and skipped (the CPU tensors are never touched)."""
    launches: dict[tuple, Launch] = {}

    def add(launch):
        launches.setdefault(_signature_key(launch), launch)

    def jit_run(self, *args, grid, warmup, **kwargs):
        add(Launch(self, args, kwargs, None))

    def tuner_run(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        add(Launch(self.fn, args, kwargs, self))
        self.best_config = self.configs[0]  # as a real run leaves it (TunedLauncher reads it)

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        exercise()
    finally:
        JITFunction.run, Autotuner.run = saved
    return list(launches.values())


def exercise(dtypes: list[torch.dtype], head_dims: tuple[int, ...]) -> None:
    """Forward and backward of every op's Triton entry point, over the dtypes and flags that pick kernels."""
    for dtype in dtypes:
        for d in head_dims:
            for causal, dropout_p in itertools.product((False, True), (0.0, 0.1)):
                # As the model passes them: transposed views of [B, L, H, d] projections.
                q = torch.zeros(2, 64, 4, d, dtype=dtype, requires_grad=True).transpose(1, 2)
                k = torch.zeros(2, 64, 2, d, dtype=dtype, requires_grad=True).transpose(1, 2)
                v = torch.zeros(2, 64, 2, d, dtype=dtype, requires_grad=True).transpose(1, 2)
                out = memory_attention_triton(q, k, v, torch.tensor([64, 20]), causal, d ** -0.5, dropout_p)
                out.backward(torch.zeros_like(out))
        # The dropout mask of the tests (dropout_keep_mask): a plain launch.
        dropout_keep_mask(draw_philox("cpu"), 2, 4, 64, 0.1)
        hidden = torch.zeros(3, 10, 4096, dtype=dtype, requires_grad=True)
        pooled = span_mean_pool_triton(hidden, torch.tensor([0, 2, 5]), torch.tensor([8, 3, 5]))
        pooled.backward(torch.zeros_like(pooled))
        # B, N: one split (gradients added in place), and enough rows to split both sides (added atomically).
        for (B, N), symmetric in itertools.product([(8, 12), (300, 600)], (False, True)):
            queries = torch.zeros(B, 1024, dtype=dtype, requires_grad=True)
            docs = torch.zeros(N, 1024, dtype=dtype, requires_grad=True)
            contrastive_loss_triton(queries, docs, torch.arange(B), 0.05, True, symmetric, "mean").backward()
        for vocab in (1031, 32000):
            weight = torch.zeros(vocab, 64, dtype=dtype, requires_grad=True)
            student = torch.zeros(5, 64, dtype=dtype, requires_grad=True)
            linear_kl_loss_triton(student, torch.zeros(5, 64, dtype=dtype), weight, None, 1.0, 4).backward()


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack (spills) and static shared memory of a cubin's kernel, from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(x for x in text.splitlines() if "REG:" in x)
    return {k: int(v) for k, v in (field.split(":") for field in line.split() if field.split(":")[0]
                                   in ("REG", "STACK", "LOCAL"))}


def check(launches: list[Launch], archs: list[int]) -> bool:
    ok = True
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        print(f"== sm_{arch}")
        for launch in launches:
            fitting = clean = 0
            print(f"  {launch.describe()}")
            for kwargs in launch.configs():
                label = " ".join(f"{k}={v}" for k, v in kwargs.items() if k in ("num_warps", "num_stages")
                                 or k not in launch.kwargs and k not in LAUNCH_OPTIONS) or "fixed"
                start = time.perf_counter()
                try:
                    options, signature, constexprs, attrs = launch.specialize(target, kwargs)
                    compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                              options=options.__dict__)
                except Exception as exc:
                    print(f"    FAILED {label}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}")
                    ok = False
                    continue
                usage = resource_usage(compiled.asm["cubin"])
                shared = compiled.metadata.shared
                fits = shared <= MAX_SHARED.get(arch, 49152)
                fitting += fits
                clean += fits and not usage["STACK"]
                note = "" if fits else "  (over this GPU's shared memory: the autotuner skips it)"
                spill = f"  SPILLS {usage['STACK']} B" if usage["STACK"] else ""
                print(f"    {label:<40} regs {usage['REG']:3d}  smem {shared:6d} B  "
                      f"{time.perf_counter() - start:4.1f}s{spill}{note}")
            if fitting == 0 or (clean == 0 and launch.low_precision()):
                spilling = " without spilling" if fitting else ""
                print(f"    FAILED: no config of {launch.fn.__name__} fits sm_{arch}{spilling}")
                ok = False
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--quick", action="store_true", help="bfloat16 and head dims 64/128/256 only")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"],
                        choices=["bfloat16", "float16", "float32"], help="input dtypes (default: all three)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 80, 128, 256],
                        help="memory_attention head dims (default 64 80 128 256)")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = parser.parse_args()
    dtypes = [torch.bfloat16] if args.quick else [getattr(torch, name) for name in args.dtypes]
    head_dims = (64, 128, 256) if args.quick else tuple(args.head_dims)
    launches = [x for x in record_launches(lambda: exercise(dtypes, head_dims)) if args.only in x.fn.__name__]
    print(f"triton {triton.__version__}: {len(launches)} distinct launches")
    sys.exit(0 if check(launches, args.arch) else 1)


if __name__ == "__main__":
    main()
