"""Run every benchmark: ``python -m benchmarks [--quick] [--only attention,contrastive_loss] [--out DIR]``.

Discovers `benchmarks/bench_*.py`, runs each module's ``run(quick)``, prints its table, writes its JSON
under `--out` (default `benchmarks/results/`) and renders one plot per result file. A benchmark that
fails is reported and the others still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

import torch

from . import harness
from .plot import plot_results

HERE = Path(__file__).parent


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: proves the harness, claims no timings")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {discover()}")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR), help="result folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or discover()
    unknown = sorted(set(names) - set(discover()))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; available: {discover()}")
    if args.quick and not torch.cuda.is_available():
        harness.use_triton_interpreter()  # before a benchmark imports a kernel (llm2comp imports some)
    failures = []
    for name in names:
        print(f"\n## {name}", flush=True)
        try:
            run = importlib.import_module(f"benchmarks.bench_{name}").run
        except Exception:
            traceback.print_exc()
            failures.append(name)
            continue
        try:
            rows, path, error = harness.run_and_write(name, run, args.quick, args.out)
        except SystemExit as exc:  # a bench that cannot run here (a kernel bench on the CPU without --quick)
            print(exc, file=sys.stderr)
            failures.append(name)
            continue
        print(harness.format_table(rows))
        print(f"wrote {path}")
        if error is not None:
            traceback.print_exception(error)
            failures.append(name)
        if not args.no_plots:
            plot = plot_results(path)
            if plot is not None:
                print(f"plotted {plot}")
    if failures:
        print(f"failed: {failures}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
