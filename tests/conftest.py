import os

import pytest
import torch

# Triton kernels run on the CPU interpreter when no GPU is visible; it must be set before triton
# compiles any kernel, so it is set here, before the test modules import the ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poison_empty():
    """torch.empty & co. return NaN-filled memory (torch's deterministic mode), so an output element a
    kernel forgets to write shows up as NaN instead of as whatever the allocator handed back. warn_only:
    nondeterministic torch ops (cuBLAS without CUBLAS_WORKSPACE_CONFIG, index_put_ ...) still run."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
