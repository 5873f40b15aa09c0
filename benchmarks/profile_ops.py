"""Where an op's time goes: device time per kernel, and the wall time of a call, under `torch.profiler`.

The benchmarks give one time per call; this splits it, to answer what that time leaves open: is
`memory_attention` at L=128 bound by the host (launch and Python) or by its kernel, how the contrastive loss's
time divides between its kernels and its cuBLAS products, what bandwidth the pooling kernels reach without the
host in the way, and how linear-KL's time divides between the matmuls and the fused kernel. The ``launch`` group
splits a Triton call's host time: an empty kernel with as many runtime arguments as the attention forward,
launched directly and through `triton.autotune`, and one with four arguments, to set against the host time of
the attention group's forward (same shapes); and that forward with Triton's launches stubbed out, i.e. the host
time of our Python alone.
Each case runs its step twice (warm-up: compile, autotune), then `CALLS` times under the profiler. Per case:
host ms per call (the CPU time of a call that does not wait for the GPU, measured outside the profiler), wall
ms per call under the profiler, device µs per call (all kernels), and the kernels by device time (µs per call,
launches per call). GPU: the benchmarks' shapes. CPU ``--quick``: tiny shapes under the Triton interpreter and
CPU op times: proves the script, measures nothing.

Run: ``python -m benchmarks.profile_ops [--quick] [--only attention,contrastive] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import harness

CALLS = 5
TOP_KERNELS = 8


def _attention_cases(quick: bool, device) -> dict[str, Callable[[], object]]:
    from llm2comp_kernels.memory_attention import memory_attention

    B, Hq, Hkv, L, d = (2, 4, 2, 32, 16) if quick else (32, 32, 8, 128, 128)
    dtype = torch.float32 if quick else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, h, L, d, generator=g, device=device, dtype=dtype) for h in (Hq, Hkv, Hkv))
    seq_lens = torch.randint(L // 4, L + 1, (B,), generator=g, device=device, dtype=torch.int32)
    cases = {}
    for backend in ("triton",) if quick else ("triton", "cuda"):
        cases[f"memory_attention fwd {backend} B{B} L{L} d{d}"] = harness.forward_step(
            functools.partial(memory_attention, backend=backend), q, k, v, seq_lens)
    return cases


def _contrastive_cases(quick: bool, device) -> dict[str, Callable[[], object]]:
    from llm2comp_kernels.contrastive_loss import contrastive_loss
    from llm2comp_kernels.testing import make_contrastive_inputs

    B, D = (40, 32) if quick else (8192, 1024)
    q, d = make_contrastive_inputs(B, B, D, dtype=torch.bfloat16, device=device, positive_weight=0.15,
                                   draw_on_device=True)
    cases = {}
    for backend in ("triton",) if quick else ("triton", "cuda"):
        fn = lambda a, b, backend=backend: contrastive_loss(a, b, temperature=0.05, backend=backend)  # noqa: E731
        cases[f"contrastive_loss fwd+bwd {backend} B{B} D{D}"] = harness.fwd_bwd_step(fn, q, d)
    return cases


def _pool_cases(quick: bool, device) -> dict[str, Callable[[], object]]:
    from llm2comp_kernels.span_mean_pool import span_mean_pool
    from llm2comp_kernels.testing import make_pool_inputs

    B, L, D, span = (4, 24, 64, 8) if quick else (512, 512, 4096, 8)
    hidden, start, length = make_pool_inputs(B, L, D, dtype=torch.bfloat16, device=device, span=span,
                                             requires_grad=False, draw_on_device=True)
    h = hidden.detach().requires_grad_(True)
    grad = torch.randn(B, D, device=device, dtype=hidden.dtype)
    cases = {}
    for backend in ("triton",) if quick else ("triton", "cuda"):
        cases[f"span_mean_pool fwd {backend} B{B} D{D} span{span}"] = harness.forward_step(
            functools.partial(span_mean_pool, backend=backend), hidden, start, length)
        # The backward writes the dense [B, L, D] gradient: Triton as a zero fill plus a span kernel, CUDA in one.
        cases[f"span_mean_pool fwd+bwd {backend} B{B} L{L} D{D} span{span}"] = harness.fwd_bwd_step(
            lambda x, backend=backend: span_mean_pool(x, start, length, backend=backend), h, grad_output=grad)
    return cases


def _linear_kl_cases(quick: bool, device) -> dict[str, Callable[[], object]]:
    from llm2comp_kernels.linear_kl_loss import linear_kl_loss
    from llm2comp_kernels.testing import make_linear_kl_inputs

    N, H, V = (16, 32, 1000) if quick else (8192, 4096, 128256)
    dtype = torch.float32 if quick else torch.bfloat16
    student, teacher, weight = make_linear_kl_inputs(N, H, V, dtype=dtype, device=device, draw_on_device=True)
    fn = lambda s, t, w: linear_kl_loss(s, t, w, backend="triton")  # noqa: E731
    return {f"linear_kl_loss fwd+bwd triton N{N} H{H} V{V}": harness.fwd_bwd_step(fn, student, teacher, weight)}


@functools.cache
def _empty_kernels():
    """Triton kernels that load nothing and store one value: one with the attention forward's 28 runtime
    arguments (6 tensors, 22 integers and floats), one with 4; and the first behind `triton.autotune`."""
    import triton
    import triton.language as tl

    @triton.jit
    def wide(Q, K, V, O, LSE, LENS, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15,
             Hq, group, L, d, bucket, scale, BLOCK: tl.constexpr):
        if tl.program_id(0) == 0:
            tl.store(LSE, scale)

    @triton.jit
    def narrow(Q, LSE, L, scale, BLOCK: tl.constexpr):
        if tl.program_id(0) == 0:
            tl.store(LSE, scale)

    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (32, 64)]
    return wide, narrow, triton.autotune(configs, key=["L", "d", "bucket"])(wide)


def _launch_cases(quick: bool, device) -> dict[str, Callable[[], object]]:
    import triton

    wide, narrow, wide_tuned = _empty_kernels()
    B, Hq, Hkv, L, d = (2, 4, 2, 32, 16) if quick else (32, 32, 8, 128, 128)
    dtype = torch.float32 if quick else torch.bfloat16
    q, k, v = (torch.randn(B, h, L, d, device=device, dtype=dtype) for h in (Hq, Hkv, Hkv))
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, device=device, dtype=torch.float32)
    seq_lens = torch.full((B,), L, device=device, dtype=torch.int32)
    wide_args = (q, k, v, o, lse, seq_lens, *q.stride(), *k.stride(), *v.stride(), *o.stride(), Hq, Hq // Hkv, L, d,
                 128, 0.125)
    grid = (triton.cdiv(L, 64), Hq, B)  # as memory_attention's kernels launch
    cases = {"launch: empty Triton kernel, 28 runtime args, direct": lambda: wide[grid](*wide_args, BLOCK=64),
             "launch: empty Triton kernel, 4 runtime args, direct": lambda: narrow[grid](q, lse, L, 0.125, BLOCK=64)}
    if not quick:  # the interpreter has no driver to tune with, nor JITFunction.run to stub
        cases["launch: empty Triton kernel, 28 runtime args, autotuned (cached)"] = lambda: wide_tuned[grid](*wide_args)
        cases["launch: memory_attention fwd triton, JIT launches stubbed (our Python alone)"] = _jit_stubbed(
            _attention_cases(quick, device)[f"memory_attention fwd triton B{B} L{L} d{d}"])
    return cases


def _jit_stubbed(step: Callable[[], object]) -> Callable[[], object]:
    """`step` with Triton's `JITFunction.run` (binding, specialization, cache lookup, launch) a no-op during the
    call, after one real call (compiled and tuned): what the call costs the host besides Triton's launch."""
    from triton.runtime.jit import JITFunction

    step()
    torch.cuda.synchronize()

    def stubbed():
        real = JITFunction.run
        JITFunction.run = lambda self, *args, **kwargs: None
        try:
            return step()
        finally:
            JITFunction.run = real
    return stubbed


GROUPS = {"attention": _attention_cases, "contrastive": _contrastive_cases, "pool": _pool_cases,
          "linear_kl": _linear_kl_cases, "launch": _launch_cases}


def profile_case(step: Callable[[], object], device: torch.device) -> dict:
    """Wall and device time per call of `step`, and its kernels by device time (CPU: its ops by CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # compile, autotune
        step()
    sync()
    host_ms = statistics.median(harness.host_times_ms(step))
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(CALLS):
            step()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / CALLS
    if device.type == "cuda":
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total  # noqa: E731  (µs, all calls)
    else:
        events = list(prof.key_averages())
        time_of = lambda e: e.self_cpu_time_total  # noqa: E731
    events.sort(key=time_of, reverse=True)
    return {"host_ms_per_call": host_ms, "wall_ms_per_call": wall_ms,
            "time_us_per_call": sum(time_of(e) for e in events) / CALLS,
            "time_is": "device (all kernels)" if device.type == "cuda" else "CPU ops (self), not a GPU figure",
            "kernels": [{"name": e.key[:120], "us_per_call": time_of(e) / CALLS, "launches_per_call": e.count / CALLS}
                        for e in events[:TOP_KERNELS]]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU interpreter: proves the script")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {sorted(GROUPS)}")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR), help="result folder")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(GROUPS)
    if unknown := sorted(set(names) - set(GROUPS)):
        parser.error(f"unknown groups {unknown}; available: {sorted(GROUPS)}")
    device = harness.kernel_device("profile_ops", args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    cases, start = [], time.perf_counter()
    for name in names:
        for case, step in GROUPS[name](args.quick, device).items():
            try:
                result = profile_case(step, device)
            except Exception as exc:  # one case failing is a result
                result = {"status": f"failed: {exc.__class__.__name__}: {str(exc)[:200]}"}
            cases.append({"case": case, **result})
            print(f"\n## {case}: " + (result.get("status") or f"{result['host_ms_per_call']:.3f} ms host, "
                                       f"{result['wall_ms_per_call']:.3f} ms wall per call (profiled), "
                                       f"{result['time_us_per_call']:.1f} µs {result['time_is']}"))
            for k in result.get("kernels", []):
                print(f"  {k['us_per_call']:10.1f} µs  x{k['launches_per_call']:<5.3g} {k['name']}")
            # After every case: a run cut short by its time limit keeps what it measured.
            environment = {**harness.environment(), "wall_s": round(time.perf_counter() - start, 1)}
            path.write_text(json.dumps({"environment": environment, "cases": cases}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
