"""The GPU run's test outcome as one JSON file.

``python -m benchmarks.tests_summary DIR`` reads the ``junit_<phase>.xml`` and ``sanitize_<tool>.log`` files that
`benchmarks/run_gpu.sh` leaves in DIR and writes ``DIR/tests_gpu.json``: per phase the number of tests, failures,
errors and skips, the wall time and the ids of the failed tests (or, for a phase with a log and no XML, that it was
cut short); per compute-sanitizer tool its summary line; and
the environment (device, versions, git commit, and the run's command from ``$LLM2COMP_RUN_COMMAND``).
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_phase(path: Path) -> dict:
    """Counts, time and failed test ids of one pytest junit XML (one or several <testsuite> elements)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    cases = [case for suite in suites for case in suite.iter("testcase")]
    def has(case, tag):
        return case.find(tag) is not None
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in cases
              if has(case, "failure") or has(case, "error")]
    return {"tests": len(cases), "failures": sum(has(c, "failure") for c in cases),
            "errors": sum(has(c, "error") for c in cases), "skipped": sum(has(c, "skipped") for c in cases),
            "time_s": round(max((float(s.get("time", 0)) for s in suites), default=0.0), 1), "failed": failed}


def sanitizer_summary(path: Path) -> str:
    """The last summary line compute-sanitizer printed (or why there is none)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if "SUMMARY" in line]
    return lines[-1].strip() if lines else "no summary line (the run was cut short?)"


def cut_phase(log: Path) -> dict:
    """A phase whose pytest wrote its log (``tests_<phase>.log``) but no junit XML: it was stopped first."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return {"status": "no junit XML: the run was cut short (killed at its time limit?)",
            "last_line": lines[-1][:200] if lines else ""}


def summarize(folder: Path) -> dict:
    from benchmarks import harness

    phases = {p.stem.removeprefix("tests_"): cut_phase(p) for p in sorted(folder.glob("tests_*.log"))}
    phases.update({p.stem.removeprefix("junit_"): junit_phase(p) for p in sorted(folder.glob("junit_*.xml"))})
    return {
        "environment": {**harness.environment(), "run_command": os.environ.get("LLM2COMP_RUN_COMMAND")},
        "phases": phases,
        "sanitizer": {p.stem.removeprefix("sanitize_"): sanitizer_summary(p)
                      for p in sorted(folder.glob("sanitize_*.log"))},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the results folder of benchmarks/run_gpu.sh")
    folder = parser.parse_args(argv).folder
    summary = summarize(folder)
    path = folder / "tests_gpu.json"
    path.write_text(json.dumps(summary, indent=1))
    for phase, result in summary["phases"].items():
        if "status" in result:
            print(f"{phase}: {result['status']}")
            continue
        print(f"{phase}: {result['tests']} tests, {result['failures']} failures, {result['errors']} errors, "
              f"{result['skipped']} skipped, {result['time_s']} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
