"""Compile every Triton kernel for real GPUs (sm_80, sm_90) on a machine without one.

The CPU interpreter (TRITON_INTERPRET=1) runs the kernels' arithmetic but not Triton's compiler: a kernel can
pass every interpreter test and still fail to compile, or need more shared memory than a GPU has. This script
runs each op's Triton entry point (forward and backward) on small CPU tensors with the GPU code path, records
every launch instead of running it, then compiles each launch ahead of time for each target with every
autotune config the launch could pick, and prints registers, spills and shared memory per kernel.

Fails (exit 1) when a kernel does not compile, when a fixed-config launch needs more shared memory than the
target has, or when no autotune config of a launch fits. Spills are printed, not failed: the autotuner times
each config and a spilling one loses on its own.

    python .ci/compile_triton.py [--arch 80 90] [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the GPU code path: autotuned launches, tensor-core dots
os.environ["LLM2COMP_TRITON_AUTOTUNE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from llm2comp_kernels.contrastive_loss.triton import contrastive_loss_triton  # noqa: E402
from llm2comp_kernels.linear_kl_loss.triton import linear_kl_loss_triton  # noqa: E402
from llm2comp_kernels.memory_attention.triton import memory_attention_triton  # noqa: E402
from llm2comp_kernels.span_mean_pool.triton import span_mean_pool_triton  # noqa: E402

# Shared memory a block may use (opt-in maximum), bytes.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.int8: "i8", torch.uint8: "u8"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class Launch:
    """One recorded kernel launch: the kernel, its signature, constexprs and the configs it may run with."""

    def __init__(self, fn: JITFunction, args: tuple, kwargs: dict, tuner: Autotuner | None):
        bound = inspect.signature(fn.fn).bind_partial(*args, **{k: v for k, v in kwargs.items()
                                                                 if k in fn.arg_names})
        self.fn, self.tuner = fn, tuner
        self.signature, self.constexprs = {}, {}
        for param in fn.params:
            if param.name in bound.arguments:
                value = bound.arguments[param.name]
            elif param.has_default:
                value = param.default
            else:  # a meta-parameter the autotuner fills in
                continue
            if param.is_constexpr or value is None:
                self.signature[param.name] = "constexpr"
                self.constexprs[param.name] = value
            else:
                self.signature[param.name] = _type_name(value)
        self.options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        self.named_args = dict(bound.arguments)

    def configs(self) -> list[tuple[dict, dict]]:
        """(extra constexprs, launch options) for each config this launch can run with."""
        if self.tuner is None:
            return [({}, self.options)]
        configs = self.tuner.configs
        if self.tuner.early_config_prune is not None:
            configs = self.tuner.early_config_prune(configs, self.named_args, **self.constexprs)
        return [(dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in configs]

    def key(self) -> tuple:
        return (self.fn.__name__, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        dtypes = sorted({t for t in self.signature.values() if t.startswith("*")})
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items() if not k.startswith("BLOCK_M"))
        return f"{self.fn.__name__} [{'/'.join(dtypes)}] {consts}"


def _type_name(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(value).__name__}")


def record_launches(exercise) -> list[Launch]:
    """Run `exercise()` with every Triton launch recorded and skipped (the CPU tensors are never touched)."""
    launches: dict[tuple, Launch] = {}

    def add(launch):
        launches.setdefault(launch.key(), launch)

    def jit_run(self, *args, grid, warmup, **kwargs):
        add(Launch(self, args, kwargs, None))

    def tuner_run(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        add(Launch(self.fn, args, kwargs, self))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        exercise()
    finally:
        JITFunction.run, Autotuner.run = saved
    return list(launches.values())


def exercise(quick: bool) -> None:
    """Forward and backward of every op's Triton entry point, over the dtypes and flags that pick kernels."""
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for dtype in dtypes:
        for d in ((64, 128) if quick else (64, 80, 128)):
            for causal in (False, True):
                q = torch.zeros(2, 4, 24, d, dtype=dtype, requires_grad=True)
                k = torch.zeros(2, 2, 24, d, dtype=dtype, requires_grad=True)
                v = torch.zeros_like(k, requires_grad=True)
                out = memory_attention_triton(q, k, v, torch.tensor([24, 5]), causal, d ** -0.5)
                out.backward(torch.zeros_like(out))
        hidden = torch.zeros(3, 10, 4096, dtype=dtype, requires_grad=True)
        pooled = span_mean_pool_triton(hidden, torch.tensor([0, 2, 5]), torch.tensor([8, 3, 5]))
        pooled.backward(torch.zeros_like(pooled))
        for symmetric in (False, True):
            queries = torch.zeros(8, 1024, dtype=dtype, requires_grad=True)
            docs = torch.zeros(12, 1024, dtype=dtype, requires_grad=True)
            contrastive_loss_triton(queries, docs, torch.arange(8), 0.05, True, symmetric, "mean").backward()
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
            fitting = 0
            print(f"  {launch.describe()}")
            for extra, options in launch.configs():
                constexprs = {**launch.constexprs, **extra}
                signature = {**launch.signature, **{k: "constexpr" for k in extra}}
                label = " ".join(f"{k}={v}" for k, v in {**extra, **options}.items()) or "fixed"
                start = time.perf_counter()
                try:
                    compiled = triton.compile(ASTSource(launch.fn, signature, constexprs), target=target,
                                              options=options)
                except Exception as exc:
                    print(f"    FAILED {label}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}")
                    ok = False
                    continue
                usage = resource_usage(compiled.asm["cubin"])
                shared = compiled.metadata.shared
                fits = shared <= MAX_SHARED.get(arch, 49152)
                fitting += fits
                note = "" if fits else "  (over this GPU's shared memory: the autotuner skips it)"
                spill = f"  SPILLS {usage['STACK']} B" if usage["STACK"] else ""
                print(f"    {label:<40} regs {usage['REG']:3d}  smem {shared:6d} B  "
                      f"{time.perf_counter() - start:4.1f}s{spill}{note}")
            if fitting == 0:
                print(f"    FAILED: no config of {launch.fn.__name__} fits sm_{arch}")
                ok = False
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--quick", action="store_true", help="bfloat16 and head dims 64/128 only")
    args = parser.parse_args()
    launches = record_launches(lambda: exercise(args.quick))
    print(f"triton {triton.__version__}: {len(launches)} distinct launches")
    sys.exit(0 if check(launches, args.arch) else 1)


if __name__ == "__main__":
    main()
