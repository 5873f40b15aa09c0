"""Embedding quantization with sentence-transformers' semantics (``quantize_embeddings``), numpy only.

| precision | dtype | shape | value |
| float32 | float32 | [n, D] | unchanged |
| uint8 | uint8 | [n, D] | ``floor((x - min) / step)`` clipped to 0..255, ``step = (max - min) / 255`` per dimension |
| int8 | int8 | [n, D] | the uint8 value minus 128 |
| ubinary | uint8 | [n, ceil(D/8)] | the signs ``x > 0`` packed 8 to a byte (``np.packbits``) |
| binary | int8 | [n, ceil(D/8)] | the ubinary bytes minus 128 |

The int8/uint8 ranges (per-dimension min and max) come from `ranges` `[2, D]`, else from
`calibration_embeddings`, else from the embeddings themselves (which needs more than one).
"""

from __future__ import annotations

__all__ = ["PRECISIONS", "check_precision", "quantize_embeddings"]

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def check_precision(precision: str) -> str:
    """`precision` if it is one of `PRECISIONS`, else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def quantize_embeddings(embeddings, precision: str, ranges=None, calibration_embeddings=None):
    """`embeddings` float `[n, D]` (numpy or torch) in `precision` (see the module's table), a numpy array."""
    import numpy as np  # here: the names above import without numpy (the command line's parser offers them)

    check_precision(precision)
    x = np.asarray(embeddings.detach().float().cpu() if hasattr(embeddings, "detach") else embeddings)
    if not np.issubdtype(x.dtype, np.floating) or x.ndim != 2:
        raise ValueError(f"embeddings must be float [n, D], got {x.dtype} of shape {x.shape}")
    if precision == "float32":
        return x.astype(np.float32)
    if not len(x):  # nothing to calibrate: the empty array of the precision's dtype and width
        width = -(-x.shape[1] // 8) if precision.endswith("binary") else x.shape[1]
        return np.zeros((0, width), dtype=np.uint8 if precision.startswith("u") else np.int8)
    if precision.endswith("binary"):
        packed = np.packbits(x > 0, axis=-1)
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    if ranges is None:
        calibration = x if calibration_embeddings is None else np.asarray(calibration_embeddings)
        if calibration.shape[0] < 2:
            raise ValueError(f"{precision} quantization needs ranges (per-dimension min and max) from more than one "
                             "embedding: encode more texts at once, or call quantize_embeddings with ranges= or "
                             "calibration_embeddings=")
        ranges = np.vstack([calibration.min(axis=0), calibration.max(axis=0)])
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, x.shape[1]):
        raise ValueError(f"ranges must be [2, {x.shape[1]}] (min and max per dimension), got {ranges.shape}")
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    levels = np.clip(np.floor((x - starts) / steps), 0, 255)
    return levels.astype(np.uint8) if precision == "uint8" else (levels - 128).astype(np.int8)
