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
