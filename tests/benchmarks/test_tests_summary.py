"""`benchmarks.tests_summary`: junit XML and sanitizer logs of a GPU run into tests_gpu.json."""

import json

from benchmarks import tests_summary

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="4" time="12.5">
<testcase classname="tests.kernels.test_a" name="test_ok[1]" time="0.1"/>
<testcase classname="tests.kernels.test_a" name="test_bad[2]" time="0.2"><failure message="x">boom</failure></testcase>
<testcase classname="tests.kernels.test_b" name="test_gpu" time="0.0"><skipped message="needs a GPU"/></testcase>
<testcase classname="tests.kernels.test_b" name="test_setup" time="0.0"><error message="fixture">err</error></testcase>
</testsuite></testsuites>"""


def test_phases_and_sanitizer_lines(tmp_path, monkeypatch):
    (tmp_path / "junit_cuda.xml").write_text(JUNIT)
    (tmp_path / "tests_cuda.log").write_text("4 tests\n")
    (tmp_path / "tests_triton.log").write_text("........ [ 40%]\n\n")  # killed before its junit XML
    (tmp_path / "sanitize_memcheck.log").write_text("== start\n========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "sanitize_racecheck.log").write_text("killed\n")
    monkeypatch.setenv("LLM2COMP_RUN_COMMAND", "PARTS=tests bash benchmarks/run_gpu.sh")
    tests_summary.main([str(tmp_path)])
    summary = json.loads((tmp_path / "tests_gpu.json").read_text())
    assert summary["phases"] == {"cuda": {
        "tests": 4, "failures": 1, "errors": 1, "skipped": 1, "time_s": 12.5,
        "failed": ["tests.kernels.test_a::test_bad[2]", "tests.kernels.test_b::test_setup"]},
        "triton": {"status": "no junit XML: the run was cut short (killed at its time limit?)",
                   "last_line": "........ [ 40%]"}}
    assert summary["sanitizer"] == {"memcheck": "========= ERROR SUMMARY: 0 errors",
                                    "racecheck": "no summary line (the run was cut short?)"}
    assert summary["environment"]["run_command"] == "PARTS=tests bash benchmarks/run_gpu.sh"
