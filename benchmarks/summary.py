"""Markdown tables of the committed results, for docs/benchmarks.md: ``python -m benchmarks.summary [FILES...]``.

Each file becomes a heading with where it came from (device, date, command, commit) and a table of its
measured rows; rows that only prove the harness (interpreter timings) are left out, and peers that could
not run are listed under the table with the reason.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .harness import RESULTS_DIR

VALUE_KEYS = ("ms", "ms_p20", "ms_p80", "host_ms", "graph_ms", "tflops", "graph_tflops", "pct_peak", "gbps",
              "graph_gbps", "pct_copy", "graph_pct_copy", "texts_per_s", "tokens_per_s", "peak_mem_mib",
              "peak_mem_understated_by_mib", "process_peak_rss_mib")
# Statuses that hold for a provider whatever the shape (listed once); any other (a failure, a timeout) is listed
# with the row's mode and shape.
PROVIDER_WIDE = ("not installed", "skipped", "no counterpart", "no loss-only path")
HARNESS_ONLY = "not a timing"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _not_measured(rows: list[dict]) -> list[str]:
    """One line per status and place (mode, shape: none for a status that holds whatever the shape), naming the
    providers it stopped."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        where = "" if r["status"].startswith(PROVIDER_WIDE) else ", ".join(str(r[k]) for k in ("mode", "shape")
                                                                             if k in r)
        groups.setdefault((r["status"], where), []).append(r.get("provider", r.get("op")))
    return sorted(f"{', '.join(sorted(set(who)))}{f' ({where})' if where else ''}: {status}"
                  for (status, where), who in groups.items())


def summarize(path: Path) -> str:
    data = json.loads(path.read_text())
    env = data["environment"]
    rows = [r for r in data["rows"] if HARNESS_ONLY not in r.get("status", "")]
    measured = [r for r in rows if any(k in r for k in VALUE_KEYS)]
    skipped = [r for r in rows if r not in measured]
    lines = [f"#### {path.stem}",
             f"{env['device']}, torch {env['torch']}, {env['date'][:10]}, commit {str(env.get('git_commit'))[:8]}: "
             f"`{env['command']}`", ""]
    if measured:
        keys = ["op", "mode", "shape", "dtype", "provider"]
        keys += [k for k in VALUE_KEYS if any(k in r for r in measured)]
        keys += sorted({k for r in measured for k in r if k.startswith("vs_")})
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in measured]
    not_run = _not_measured([r for r in skipped if "status" in r]
                            + [{**r, "provider": f"{r['provider']} graph", "status": r["graph_status"]}
                               for r in measured if "graph_status" in r])
    if not_run:
        lines += ["", "Not measured: " + "; ".join(not_run) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help=f"result JSON files (default: all in {RESULTS_DIR})")
    args = parser.parse_args(argv)
    # Benchmark files hold "rows"; others (tests_gpu.json: the outcome of the GPU tests) are not tables.
    files = [Path(f) for f in args.files] or [f for f in sorted(RESULTS_DIR.glob("*.json"))
                                              if "rows" in json.loads(f.read_text())]
    print("\n".join(summarize(f) for f in files))


if __name__ == "__main__":
    main()
