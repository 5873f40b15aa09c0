"""Backend-free validation of `span_mean_pool` arguments."""

from __future__ import annotations

from .. import _validation as v

OP = "span_mean_pool"


def check_span_mean_pool(hidden, start, length) -> None:
    v.tensor(OP, "hidden", hidden, 3, shape_doc="[B, L, D]")
    v.tensor(OP, "start", start, 1, dtypes=v.INT_DTYPES, shape_doc="[B]")
    v.tensor(OP, "length", length, 1, dtypes=v.INT_DTYPES, shape_doc="[B]")
    v.same_device(OP, "hidden", hidden, start=start, length=length)
    B, L, D = hidden.shape
    v.non_empty(OP, "hidden", B)
    if L == 0 or D == 0:
        raise ValueError(f"{OP}: hidden must have L >= 1 and D >= 1, got shape {tuple(hidden.shape)}")
    v.size(OP, "start", start.shape[0], B, "length (one entry per batch row)")
    v.size(OP, "length", length.shape[0], B, "length (one entry per batch row)")

    def check_spans():  # remembered as one check of both tensors: the length bound depends on start
        v.check_in_range(OP, "start", start, 0, L - 1, f"0 <= start[b] < L = {L}")
        v.check_in_range(OP, "length", length, 1, L - start, f"1 <= length[b] <= L - start[b] (L = {L})")

    v.check_once((start, length), (OP, L), check_spans)
