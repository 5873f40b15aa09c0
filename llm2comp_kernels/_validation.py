"""Small argument checks shared by the ops' ``checks.py`` modules.

Every failure is a TypeError (wrong kind of object or dtype) or ValueError (wrong shape or value)
whose message names the op, the argument and what was expected.
"""

from __future__ import annotations

import collections
import numbers
import weakref
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def tensor(op: str, name: str, x, ndim: int, dtypes=FLOAT_DTYPES, shape_doc: str = "") -> torch.Tensor:
    """Check that `x` is a tensor of rank `ndim` with a dtype in `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        doc = f" {shape_doc}" if shape_doc else ""
        raise ValueError(f"{op}: {name} must have {ndim} dims{doc}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {x.dtype}")
    return x


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.device != ref.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}; they must match")


def size(op: str, name: str, got: int, expected: int, what: str) -> None:
    if got != expected:
        raise ValueError(f"{op}: {name} must have {what} = {expected}, got {got}")


def non_empty(op: str, name: str, n: int, what: str = "batch size") -> None:
    if n == 0:
        raise ValueError(f"{op}: {name} is empty ({what} 0); pass at least one row")


def in_range(op: str, name: str, x: torch.Tensor, low: torch.Tensor | int, high: torch.Tensor | int,
             rule: str) -> None:
    """`check_in_range` through `check_once`: the same unmodified tensors are not checked again."""
    tensors = tuple(b for b in (x, low, high) if isinstance(b, torch.Tensor))
    check_once(tensors, (op, name, low if isinstance(low, int) else None, high if isinstance(high, int) else None),
               lambda: check_in_range(op, name, x, low, high, rule))


def check_in_range(op: str, name: str, x: torch.Tensor, low: torch.Tensor | int, high: torch.Tensor | int,
                   rule: str) -> None:
    """Raise unless ``low <= x <= high`` elementwise; `rule` states the constraint in words. Reads the values back
    to the host (one synchronisation) to report the first offender. While `torch.compile` traces, where reading
    back would break the graph, an asynchronous device-side assert instead (a CUDA device assert, fatal to the
    process's CUDA context, rather than kernels indexing out of bounds)."""
    bad = (x < low) | (x > high)
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{op}: {name} breaks {rule}")
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: {name}[{i}] = {int(x[i])} breaks {rule}")


def check_once(tensors: tuple[torch.Tensor, ...], key: tuple, check: Callable[[], None]) -> None:
    """Run `check()` (a value check that reads tensors back to the host, one synchronisation) unless these same
    unmodified `tensors` passed the check named `key` recently: a model passes one `seq_lens` to every layer, a
    training loop reuses its labels, a benchmark its inputs.

    While `torch.compile` traces, `check()` runs every call (no cache), as device-side asserts (`check_in_range`).
    """
    if torch.compiler.is_compiling():
        check()
        return
    if _CHECKED.contains(tensors, key):
        return
    check()
    _CHECKED.add(tensors, key)


class _CheckedTensors:
    """The last few (tensors, check) pairs that passed `check_once`, by the tensors' ids. Weak references and
    version counters (bumped by every in-place torch op) keep hits fresh: a new tensor, or one modified in place,
    is checked again. Writes that bypass the version counter (through ``.data`` or a numpy view of the
    storage) are not seen. Inference-mode tensors have no version counter: they are never remembered."""

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()

    def contains(self, tensors: tuple[torch.Tensor, ...], key: tuple) -> bool:
        entry = self.entries.get((key, *map(id, tensors)))
        if entry is None:
            return False
        refs, versions = entry
        return all(r() is t and v == t._version for r, v, t in zip(refs, versions, tensors))

    def add(self, tensors: tuple[torch.Tensor, ...], key: tuple) -> None:
        if any(t.is_inference() for t in tensors):
            return
        self.entries[(key, *map(id, tensors))] = (tuple(map(weakref.ref, tensors)), tuple(t._version for t in tensors))
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)


_CHECKED = _CheckedTensors()


def type_name(value) -> str:
    """`value`'s type for an error: ``bool``, ``numpy.bool``... (a bare "bool" would not say which one)."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def flag(op: str, name: str, value) -> bool:
    """`value`, a Python bool (a numpy bool or a tensor is refused: `if tensor` would sync or be ambiguous)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type_name(value)}")
    return value


def positive_int(op: str, name: str, value) -> int:
    """`value` as an int >= 1 (Python or numpy integers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type_name(value)}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be an int >= 1, got {value}")
    return int(value)


def positive_float(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # int, float, numpy scalars
        raise TypeError(f"{op}: {name} must be a number, got {type_name(value)}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return float(value)


def probability(op: str, name: str, value) -> float:
    """`value` as a float in [0, 1) (a dropout probability)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {type_name(value)}")
    if not 0 <= value < 1:
        raise ValueError(f"{op}: {name} must be in [0, 1), got {value}")
    return float(value)


def choice(op: str, name: str, value, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value


def rows_per_chunk(row_bytes: int, device: torch.device) -> int:
    """Rows of a working buffer of `row_bytes` per row that fit the torch backends' memory budget.

    The budget is a quarter of the free GPU memory (capped at 2 GiB), or 512 MiB on the CPU.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 4, 2 << 30)
    else:
        budget = 512 << 20
    return max(1, budget // max(1, row_bytes))
