"""Evaluation of text encoders on the Lee benchmark: cosine similarity vs human ratings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.lee import LeeBenchmark, load_lee

__all__ = ["evaluate_lee", "pearson", "spearman"]


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D sequences."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Group equal values; each group gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of tie-averaged ranks)."""
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def evaluate_lee(model, data_dir: str | Path | None = None, pooling: str | None = None,
                 batch_size: int = 8, bench: LeeBenchmark | None = None) -> dict[str, float]:
    """Pearson and Spearman correlation of embedding cosine similarity with the human ratings (1225 pairs).

    `model` is an `LLM2Comp` (``pooling`` applies to it) or anything with a sentence-transformers
    style ``encode(texts, batch_size=...)`` (then `pooling` must be None). `bench`: the benchmark already
    loaded (`load_lee`), else it is read from `data_dir`.
    """
    bench = bench if bench is not None else load_lee(data_dir)
    kwargs = {"batch_size": batch_size}
    if pooling is not None:
        kwargs["pooling"] = pooling
    emb = np.asarray(model.encode(bench.documents, **kwargs), dtype=np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    i, j = np.array(bench.pairs).T
    cosine = (emb[i] * emb[j]).sum(axis=1)
    return {"pearson": pearson(cosine, bench.ratings), "spearman": spearman(cosine, bench.ratings)}
