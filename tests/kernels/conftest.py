import pytest


@pytest.fixture(autouse=True)
def fixed_triton_blocks(monkeypatch):
    """Fixed Triton blocks (no autotuning) on a GPU too, except where a test re-enables it: tuning would
    compile every config for each shape, dtype and flag of the test matrix, minutes of GPU time."""
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "0")
