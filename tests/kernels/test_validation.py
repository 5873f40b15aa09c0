"""The value-check cache of `llm2comp_kernels._validation`: a check that reads tensors back to the host runs once
per unmodified tensors, and again whenever they change."""

import pytest
import torch

from llm2comp_kernels import span_mean_pool
from llm2comp_kernels._validation import check_once


def test_check_once_runs_again_only_when_something_changed():
    calls = []
    a, b = torch.arange(4), torch.ones(4)
    for _ in range(3):
        check_once((a, b), ("op", 1), lambda: calls.append(1))
    assert len(calls) == 1
    check_once((a, b), ("op", 2), lambda: calls.append(1))           # another check of the same tensors
    assert len(calls) == 2
    b.add_(1)                                                           # in-place edit: new version
    check_once((a, b), ("op", 1), lambda: calls.append(1))
    assert len(calls) == 3
    check_once((a, b.clone()), ("op", 1), lambda: calls.append(1))     # equal values, another tensor
    assert len(calls) == 4
    with torch.inference_mode():                                        # no version counter: never cached
        c = torch.arange(4)
    for _ in range(2):
        check_once((c,), ("op", 1), lambda: calls.append(1))
    assert len(calls) == 6


def test_failed_check_is_not_remembered():
    x = torch.arange(3)

    def check():
        raise ValueError("bad")

    for _ in range(2):
        with pytest.raises(ValueError, match="bad"):
            check_once((x,), ("op",), check)


def test_span_mean_pool_checks_spans_again_after_an_in_place_change():
    hidden = torch.randn(2, 6, 4)
    start, length = torch.tensor([0, 2]), torch.tensor([3, 4])
    span_mean_pool(hidden, start, length, backend="torch")
    span_mean_pool(hidden, start, length, backend="torch")
    length[1] = 5                                                       # 2 + 5 > L = 6
    with pytest.raises(ValueError, match=r"length\[1\] = 5"):
        span_mean_pool(hidden, start, length, backend="torch")
    length[1] = 4
    start[0] = 6
    with pytest.raises(ValueError, match=r"start\[0\] = 6"):
        span_mean_pool(hidden, start, length, backend="torch")


def test_numbers_may_be_numpy_scalars_not_tensors():
    import numpy as np

    from llm2comp_kernels._validation import positive_float

    assert positive_float("op", "temperature", np.float32(0.05)) == pytest.approx(0.05)
    assert positive_float("op", "temperature", np.int64(2)) == 2.0
    with pytest.raises(TypeError, match="op: temperature must be a number, got torch.Tensor"):
        positive_float("op", "temperature", torch.tensor(0.05))


@pytest.mark.parametrize("start, length", [([0, 5], [2, 3]), ([0, -1], [2, 1]), ([0, 1], [2, 0])])
def test_compiled_value_checks_assert_on_the_device(start, length):
    """Under torch.compile the host-side value checks would break the graph; a bad span must still stop the op
    (a device-side assert) instead of reading out of bounds."""
    pool = torch.compile(lambda h, s, n: span_mean_pool(h, s, n, backend="torch"), fullgraph=True)
    hidden = torch.randn(2, 7, 4)
    ok = pool(hidden, torch.tensor([0, 1]), torch.tensor([2, 3]))
    torch.testing.assert_close(ok, span_mean_pool(hidden, torch.tensor([0, 1]), torch.tensor([2, 3])))
    with pytest.raises(RuntimeError, match="span_mean_pool: (start|length) breaks"):
        pool(hidden, torch.tensor(start), torch.tensor(length))
