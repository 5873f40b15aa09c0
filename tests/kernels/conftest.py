import pytest


@pytest.fixture(autouse=True)
def fixed_triton_blocks(monkeypatch):
    """Fixed Triton blocks (no autotuning) on a GPU too, except where a test re-enables it: tuning would
    compile every config for each shape, dtype and flag of the test matrix, minutes of GPU time."""
    monkeypatch.setenv("LLM2COMP_TRITON_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def _emulated_kernels():
    from tests import cuda_emulation

    try:
        return cuda_emulation.load()
    except cuda_emulation.Unavailable as e:
        pytest.skip(f"CUDA kernels cannot be emulated here: {e}")


@pytest.fixture
def emulated(_emulated_kernels):
    """The csrc/ kernels built for the CPU emulator (tests/cuda_emulation), with the default thread schedule."""
    from tests.cuda_emulation import call

    call(_emulated_kernels, "emu_set_schedule", 0, 0, False)
    return _emulated_kernels
