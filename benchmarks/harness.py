"""Timing, memory and reporting shared by every `benchmarks/bench_<op>.py`.

A bench module exposes ``run(quick: bool) -> list[dict]``; each row holds at least ``op``,
``shape``, ``dtype``, ``provider``, ``mode`` and the measurement keys that `measure` returns. It collects
its rows in `live_rows()`, so that a run stopped midway (its time cap's SIGTERM, a crash) still writes those
it measured (`run_and_write`). Run one with ``python -m benchmarks.bench_<op> [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llm2comp.evaluation.suite import cpu_name, git_commit

RESULTS_DIR = Path(__file__).parent / "results"
# A call longer than this is timed over LONG_CALL_REPEATS calls, not by do_bench, whose five estimation calls,
# warm-up and repeats (plus ten host-time calls) cost tens of seconds per row at 32k x 32k shapes, where L2 and
# launch effects are nil anyway.
LONG_CALL_MS = 50.0
LONG_CALL_REPEATS = 3


def measure(fn: Callable[[], object], device: str | torch.device, *, warmup_ms: float = 25,
            rep_ms: float = 100) -> dict:
    """Median/p20/p80 time in ms and peak memory in MiB of calling a kernel-sized `fn` (milliseconds).

    On CUDA: CUDA-event timing via `triton.testing.do_bench` (L2 flushed between calls) and
    `torch.cuda.max_memory_allocated` above what was allocated before, over one call after a warm-up
    call (the warm-up compiles and autotunes: Triton's tuner holds a 256 MiB L2-flush buffer that is
    not the op's memory), and ``host_ms``: the median CPU time of a call that does not wait for the GPU
    (checks, allocations, launches; when it comes near ``ms`` the op is launch-bound). A call of more than
    `LONG_CALL_MS` is timed by events over `LONG_CALL_REPEATS` calls instead (one host-time call). On CPU: as
    `measure_end_to_end`.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return measure_end_to_end(fn, device, rep_ms=rep_ms)
    check_deadline()
    import triton.testing

    peak, call_ms = _cuda_peak_mib(fn)
    if call_ms > LONG_CALL_MS:
        times = [_event_ms(fn) for _ in range(LONG_CALL_REPEATS)]
        q = _quintiles(times)
        p20, median, p80 = q[0], statistics.median(times), q[3]
        host = _wall_clock_ms(fn, rep_ms=0, min_calls=1)
    else:
        p20, median, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        host = host_times_ms(fn)
    torch.cuda.synchronize()
    return {"ms": median, "ms_p20": p20, "ms_p80": p80, "host_ms": statistics.median(host), "peak_mem_mib": peak}


def _event_ms(fn: Callable[[], object]) -> float:
    """GPU time in ms of one call of `fn`, between CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def graph_ms(calls: list[Callable[[], object]], rep_ms: float = 50, replays: int = 10) -> dict:
    """Device time per call without the host: the median over `replays` of one CUDA graph that runs `calls` in
    turn, repeated to about `rep_ms`, divided by the calls it holds. `calls` are one op on distinct inputs, so
    that a call does not find its inputs in L2 from the previous one (give them more bytes than L2 holds).

    Where `measure`'s time (events around each call) is about its ``host_ms``, the host is the bound; this is the
    kernels' own time, the figure to set against a roofline. Returns ``graph_ms``, or ``graph_status`` when the
    calls cannot be captured (a host sync, say: warm them up first so checks and autotuning are done).
    """
    try:
        check_deadline()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # warm up where the capture will run
            for call in calls:
                call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        torch.cuda.synchronize()
        repeats = max(1, min(1000, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                for call in calls:
                    call()
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / (repeats * len(calls)))
    except Exception as exc:  # not capturable: a result, not a crash
        return {"graph_status": f"failed: {exc.__class__.__name__}: {str(exc)[:160]}"}
    return {"graph_ms": statistics.median(times)}


def measure_end_to_end(fn: Callable[[], object], device: str | torch.device, *, rep_ms: float = 2000,
                       min_calls: int = 3) -> dict:
    """Median/p20/p80 wall time in ms of synchronised calls of `fn` (at least `min_calls`, more while under
    `rep_ms`) after a warm-up call, and peak memory: for paths of a second or more per call, where
    do_bench's estimation calls alone would take minutes.

    Peak memory: on CUDA `max_memory_allocated` above what was allocated before, over one call; on CPU the
    process's peak resident memory during these calls (Linux: the high-water mark reset first; elsewhere since
    the process started), the model and libraries included.
    """
    device = torch.device(device)
    check_deadline()
    if device.type == "cuda":
        memory = {"peak_mem_mib": _cuda_peak_mib(fn)[0]}
        times = _wall_clock_ms(fn, rep_ms, min_calls, sync=torch.cuda.synchronize)
    else:
        reset = _reset_peak_rss()
        fn()  # warm-up
        times = _wall_clock_ms(fn, rep_ms, min_calls)
        peak = _proc_status_mib("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        memory = {"process_peak_rss_mib": peak}
    q = _quintiles(times)
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3], **memory}


def check_deadline() -> None:
    """Raise once the run's time budget is spent: ``$LLM2COMP_BENCH_DEADLINE`` (Unix seconds), set by
    `benchmarks/run_gpu.sh` so that a benchmark cut short still records its remaining rows (as failed with
    this reason) and writes its JSON, instead of being killed with nothing written. Benches call it first in
    each row, before the row's setup (inputs, compilation, a model to load)."""
    deadline = os.environ.get("LLM2COMP_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        raise TimeoutError("not measured: the run's time budget ($LLM2COMP_BENCH_DEADLINE) was spent")


def _cuda_peak_mib(fn: Callable[[], object]) -> tuple[float, float]:
    """CUDA memory allocated at the peak of one call of `fn`, above what was allocated before it, after a
    warm-up call (which compiles and autotunes), and that call's GPU time in ms. A step that keeps gradients
    (`fwd_bwd_step`) has them released after the warm-up: left in the baseline, they would be freed at the next
    call's start and their size subtracted from its peak."""
    fn()
    getattr(fn, "release", lambda: None)()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call_ms = _event_ms(fn)
    return (torch.cuda.max_memory_allocated() - base) / 2**20, call_ms


def host_times_ms(fn: Callable[[], object]) -> list[float]:
    """CPU time in ms of each of 10 calls of `fn` that do not wait for the GPU (checks, allocations, launches)."""
    return _wall_clock_ms(fn, rep_ms=0, min_calls=10)


def _wall_clock_ms(fn: Callable[[], object], rep_ms: float, min_calls: int = 3, max_calls: int = 100,
                   sync: Callable[[], object] = lambda: None) -> list[float]:
    """Wall time in ms of each call of `fn` (then `sync`): at least `min_calls`, more while under `rep_ms`."""
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_calls or (time.perf_counter() < deadline and len(times) < max_calls):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _quintiles(times: list[float]) -> list[float]:
    """The 20/40/60/80th percentiles of `times`, within their range (inclusive method)."""
    return statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4


def _reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (VmHWM; Linux only). Whether it was."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status_mib(key: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1]) / 1024


def rss_peak_increase_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory during `fn()` above the resident memory just before it (Linux VmHWM - VmRSS).

    Meant for a fresh process (see `cpu_memory_rows`): the high-water mark covers the whole process.
    """
    before = _proc_status_mib("VmRSS:")
    fn()
    return _proc_status_mib("VmHWM:") - before


def cpu_memory_rows(module: str, base_row: dict, providers: tuple[str, ...]) -> list[dict]:
    """One row per provider with the CPU peak-memory increase of one fwd+bwd, each in a fresh subprocess.

    `module` must define ``memory_child(provider) -> float`` (MiB, via `rss_peak_increase_mib`) that builds
    its own inputs, so neither torch's own allocations nor the inputs are counted.
    """
    rows = []
    for provider in providers:
        row = {**base_row, "provider": provider,
               "measured": "VmHWM - VmRSS before, one fwd+bwd in a fresh subprocess"}
        if not Path("/proc/self/status").exists():
            rows.append({**row, "status": "skipped: needs Linux /proc"})
            continue
        code = f"from {module} import memory_child; print(memory_child({provider!r}))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=Path(__file__).parent.parent)
        if done.returncode != 0:
            rows.append({**row, "status": f"failed: {done.stderr.strip().splitlines()[-1][:200]}"})
            continue
        rows.append({**row, "peak_mem_mib": float(done.stdout.strip().splitlines()[-1])})
    return rows


def matmul_peak_row(op: str, device: torch.device, quick: bool) -> dict:
    """A row with the TFLOP/s of one large bf16 `torch.mm` (cuBLAS) on `device`, measured in this run: the ceiling
    that `add_pct_peak` divides by (a measured one, not the datasheet's). 8192^3 on a GPU; a 256^3 float32 product
    on the CPU under ``--quick``, which only proves the harness."""
    n, dtype = (256, torch.float32) if device.type != "cuda" else (8192, torch.bfloat16)
    row = {"op": op, "mode": "matmul peak", "shape": f"{n}x{n}x{n}", "dtype": str(dtype).replace("torch.", ""),
           "provider": "torch.mm"}
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))  # random: zeros run fast
    try:
        ms = measure(lambda: a @ b, device)["ms"]
    except Exception as exc:  # the run's deadline, say: the other rows keep their figures
        return failed(row, exc)
    row.update(ms=ms, tflops=2 * n**3 / (ms * 1e-3) / 1e12)
    return row if device.type == "cuda" else {**row, "status": "CPU --quick harness check: not a timing"}


def add_pct_peak(rows: list[dict], peak: dict) -> None:
    """Set ``pct_peak`` (100 * tflops / the measured matmul TFLOP/s of `peak`) on the rows that report tflops."""
    if "tflops" not in peak:
        return
    for r in rows:
        if "tflops" in r and r is not peak:
            r["pct_peak"] = 100 * r["tflops"] / peak["tflops"]


def forward_step(fn: Callable[..., object], *args) -> Callable[[], object]:
    """A step that runs ``fn(*args)`` under `torch.no_grad` (the op's forward alone); ``step.release()`` does nothing
    (it keeps no gradients), so benches call it on any step."""
    def step():
        with torch.no_grad():
            return fn(*args)
    step.release = lambda: None
    return step


def fwd_bwd_step(fn: Callable[..., torch.Tensor], *args, grad_output: torch.Tensor | None = None
                 ) -> Callable[[], torch.Tensor]:
    """A step that clears the gradients of `args`, runs ``fn(*args)`` and back-propagates what it returns (a scalar,
    or any tensor with `grad_output`). ``step.release()`` drops the gradients a call left (see `_cuda_peak_mib`)."""
    def release():
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None

    def step():
        release()
        out = fn(*args)
        out.backward(grad_output)
        return out
    step.release = release
    return step


def use_triton_interpreter() -> None:
    """Make Triton kernels run on the CPU; must happen before any kernel module is imported."""
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_device(name: str, quick: bool) -> torch.device:
    """The device a kernel benchmark runs on: CUDA, or the CPU interpreter under `--quick` only.

    The triton kernels need ``TRITON_INTERPRET=1`` on the CPU; it must be set before they are imported.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not quick:
        raise SystemExit(f"{name} measures on a CUDA GPU; on CPU use --quick (harness check only)")
    use_triton_interpreter()
    return torch.device("cpu")


def not_installed(package: str) -> str:
    """The status of a row whose peer could not be measured, instead of a crash or a made-up figure."""
    return f"not installed ({package})"


def failed(row: dict, exc: BaseException) -> dict:
    return {**row, "status": f"failed: {exc.__class__.__name__}: {str(exc)[:200]}"}


def end_to_end_row(row: dict, build: Callable[[], tuple[Callable[[], object], int] | str], device: str | torch.device,
                   rep_ms: float, per_second: str, per_call: str | None = None) -> dict:
    """`row` with `measure_end_to_end` of the call that ``build()`` returns as ``(fn, count)``, ``per_second`` =
    count / second per call (and ``per_call`` = count, if named); ``build()`` may return a status string instead
    (a peer not installed). Building it
    (a model to load) comes after the deadline check; its failure or the call's (an out-of-memory, the run's
    deadline) is the row's status, so the other rows survive."""
    try:
        check_deadline()
        built = build()
        if isinstance(built, str):
            return {**row, "status": built}
        fn, count = built
        result = measure_end_to_end(fn, device, rep_ms=rep_ms)
    except Exception as exc:  # a failing provider is a result, not a crash
        return failed(row, exc)
    finally:
        built = fn = None  # the model goes before the next row's loads
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return {**row, **({per_call: count} if per_call else {}), **result, per_second: count / (result["ms"] / 1e3)}


def add_ratios(rows: list[dict], peer: str, key: str = "ms", higher_is_better: bool = False) -> None:
    """Set ``vs_<peer>`` (``vs_<peer>_<key>`` for a key other than ms) on rows that share op, shape, dtype and
    mode with the peer's row: above 1 means the row beats the peer (faster, smaller, or more throughput)."""
    def group(r):
        return (r.get("op"), str(r.get("shape")), r.get("dtype"), r.get("mode"))
    name = f"vs_{peer}" if key == "ms" else f"vs_{peer}_{key}"
    peers = {group(r): r[key] for r in rows if r.get("provider") == peer and key in r}
    for r in rows:
        if key in r and group(r) in peers:
            r[name] = r[key] / peers[group(r)] if higher_is_better else peers[group(r)] / r[key]


def _command() -> str:
    """The command line as typed: ``python -m benchmarks ...``, ``llm2comp bench ...`` or ``python script.py``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        argv = [Path(sys.executable).name, "-m", spec.name.removesuffix(".__main__")]
    elif sys.argv[0].endswith(".py"):
        argv = [Path(sys.executable).name, sys.argv[0]]
    else:
        argv = [Path(sys.argv[0]).name]
    return " ".join(shlex.quote(a) for a in argv + sys.argv[1:])


def environment() -> dict:
    """Device, library versions, git commit and the exact command, stored with every result file."""
    env = {
        "command": _command(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {cpu_name()}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    for key, dist in (("triton", "triton"), ("transformers", "transformers"), ("flash_attn", "flash-attn"),
                      ("liger_kernel", "liger-kernel"), ("inf_cl", "inf-cl")):
        try:
            env[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[key] = None
    env["git_commit"] = os.environ.get("LLM2COMP_GIT_COMMIT") or git_commit()
    return env


def format_table(rows: list[dict]) -> str:
    keys = [k for k in ("op", "mode", "shape", "dtype", "provider", "ms", "host_ms", "graph_ms", "tflops", "pct_peak",
                        "gbps", "texts_per_s", "tokens_per_s", "peak_mem_mib", "process_peak_rss_mib", "status")
            if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith("vs_")})
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    table = [keys] + [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in table)


def write_results(name: str, rows: list[dict], out_dir: Path | str | None, wall_s: float) -> Path:
    """`<out_dir>/<name>_{gpu,cpu}.json`: the environment, the rows, and the run's wall time (`wall_s`, what a
    time-capped run must allow this benchmark)."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    path = out_dir / f"{name}_{tag}.json"
    path.write_text(json.dumps({"environment": {**environment(), "wall_s": round(wall_s, 1)}, "rows": rows}, indent=1))
    return path


_live: list[dict] = []


def live_rows() -> list[dict]:
    """A new list for a bench's rows, kept where `run_and_write` finds it if the bench is stopped midway: add
    each row (or each shape's rows) to it as soon as it is measured."""
    global _live
    _live = []
    return _live


def _stop_on_sigterm(signum, frame):
    raise TimeoutError("stopped by SIGTERM (the run's time cap)")


def run_and_write(name: str, run: Callable[[bool], list[dict]], quick: bool, out_dir: Path | str | None
                  ) -> tuple[list[dict], Path, BaseException | None]:
    """Run a bench and write its JSON, also when it is stopped midway: a SIGTERM (the time cap of
    `benchmarks/run_gpu.sh`) raises TimeoutError, which fails the row being measured (the next rows fail at
    once on `check_deadline`); an exception out of the bench keeps the rows of `live_rows` and adds a row saying
    where it stopped. Returns (rows, path written, the exception or None)."""
    start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    error = None
    try:
        rows = run(quick)
    except (Exception, KeyboardInterrupt) as exc:
        error, rows = exc, [*_live, {"op": name, "status": f"stopped: {exc.__class__.__name__}: {str(exc)[:200]}"}]
    finally:
        signal.signal(signal.SIGTERM, previous)
    return rows, write_results(name, rows, out_dir, time.perf_counter() - start), error


def main(name: str, run: Callable[[bool], list[dict]]) -> None:
    """Command line of a bench module: runs it, prints the table, writes the JSON (exit code 1 if it stopped)."""
    parser = argparse.ArgumentParser(description=f"Benchmark {name}")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: proves the harness, claims no timings")
    parser.add_argument("--out", default=None, help=f"result folder (default {RESULTS_DIR})")
    args = parser.parse_args()
    rows, path, error = run_and_write(name, run, args.quick, args.out)
    print(format_table(rows))
    print(f"wrote {path}")
    if error is not None:
        raise SystemExit(f"{name} stopped: {error!r}")
