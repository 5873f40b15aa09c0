"""`benchmarks.harness.measure`'s GPU path on the CPU, with CUDA events, memory counters and `do_bench` faked: which
timing a call gets, and how many calls it costs."""

import time

import pytest
import torch

from benchmarks import harness


class _FakeEvent:
    def __init__(self, enable_timing: bool = False):
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.at - self.at) * 1e3


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    for name, value in (("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 0),
                        ("max_memory_allocated", 3 << 20)):
        monkeypatch.setattr(torch.cuda, name, lambda value=value: value)
    bench_calls = []
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: bench_calls.append(fn) or
                        [1.0, 2.0, 3.0])
    return bench_calls


def _counted(seconds: float):
    def fn():
        fn.calls += 1
        time.sleep(seconds)
    fn.calls = 0
    return fn


def test_long_call_is_timed_by_a_few_event_pairs(fake_cuda):
    fn = _counted(1.5 * harness.LONG_CALL_MS / 1e3)
    result = harness.measure(fn, "cuda")
    assert not fake_cuda  # do_bench never ran
    assert fn.calls == 2 + harness.LONG_CALL_REPEATS + 1  # warm-up and peak, the timed calls, one host-time call
    assert result["ms_p20"] <= result["ms"] <= result["ms_p80"]
    assert result["ms"] >= 1.5 * harness.LONG_CALL_MS * 0.9
    assert result["peak_mem_mib"] == 3.0


def test_short_call_goes_through_do_bench(fake_cuda):
    fn = _counted(0.0)
    result = harness.measure(fn, "cuda")
    assert fake_cuda == [fn]
    assert (result["ms_p20"], result["ms"], result["ms_p80"]) == (1.0, 2.0, 3.0)
    assert fn.calls == 2 + 10  # warm-up and peak, then the ten host-time calls


def test_a_run_stopped_by_sigterm_writes_the_rows_it_measured(tmp_path):
    """run_gpu.sh's time cap sends SIGTERM: the row being measured fails, the next ones fail on the deadline, and the
    JSON holds what was measured; an exception out of the bench keeps its live rows too."""
    import json
    import os
    import signal

    def bench(quick):
        rows = harness.live_rows()
        rows.append({"op": "x", "provider": "first", "ms": 1.0})
        for provider in ("cut", "after"):
            row = {"op": "x", "provider": provider}
            try:
                harness.check_deadline()
                if provider == "cut":
                    os.environ["LLM2COMP_BENCH_DEADLINE"] = "0"  # the cap has passed when the signal comes
                    os.kill(os.getpid(), signal.SIGTERM)
                rows.append({**row, "ms": 2.0})
            except Exception as exc:
                rows.append(harness.failed(row, exc))
        return rows

    try:
        rows, path, error = harness.run_and_write("x", bench, True, tmp_path)
    finally:
        os.environ.pop("LLM2COMP_BENCH_DEADLINE", None)
    assert error is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert [r.get("status", "")[:40] for r in json.loads(path.read_text())["rows"]] == [
        "", "failed: TimeoutError: stopped by SIGTERM", "failed: TimeoutError: not measured: the "]

    def crashing(quick):
        harness.live_rows().append({"op": "x", "provider": "first", "ms": 1.0})
        raise RuntimeError("CUDA error: an illegal memory access")

    rows, path, error = harness.run_and_write("x", crashing, True, tmp_path)
    assert isinstance(error, RuntimeError)
    assert json.loads(path.read_text())["rows"] == [
        {"op": "x", "provider": "first", "ms": 1.0},
        {"op": "x", "status": "stopped: RuntimeError: CUDA error: an illegal memory access"}]


def test_an_end_to_end_row_past_the_deadline_builds_nothing(monkeypatch):
    built = []
    monkeypatch.setenv("LLM2COMP_BENCH_DEADLINE", "0")
    row = harness.end_to_end_row({"provider": "p"}, lambda: built.append(1), "cpu", 10, "texts_per_s")
    assert not built and row["status"].startswith("failed: TimeoutError")
    monkeypatch.delenv("LLM2COMP_BENCH_DEADLINE")
    assert harness.end_to_end_row({"provider": "p"}, lambda: "not installed (x)", "cpu", 10, "texts_per_s") == {
        "provider": "p", "status": "not installed (x)"}
    row = harness.end_to_end_row({"provider": "p"}, lambda: (lambda: time.sleep(0.01), 5), "cpu", 10, "texts_per_s")
    assert row["ms_p20"] <= row["ms"] <= row["ms_p80"] and 0 < row["texts_per_s"] < 500
    assert row["process_peak_rss_mib"] > 0


def test_quintiles_stay_within_the_times():
    assert harness._quintiles([10.0, 11.0, 12.0])[0] >= 10.0 and harness._quintiles([10.0, 11.0, 12.0])[3] <= 12.0
    assert harness._quintiles([4.0]) == [4.0] * 4
