"""Scores of the quality suite, each from embeddings (float `[n, D]` numpy rows) and the task's gold data.

`pearson` / `spearman` (Lee), `linear_probe` (classification), `kmeans_v_measure` (clustering),
`retrieval_scores` (one relevant document per query). scikit-learn supplies the probe and k-means.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans_v_measure", "linear_probe", "pearson", "retrieval_scores", "spearman"]


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


def linear_probe(train_x: np.ndarray, train_y, test_x: np.ndarray, test_y) -> dict[str, float]:
    """Accuracy and macro F1 on the test rows of a logistic regression fitted on the train rows.

    Features are standardised with the train rows' statistics first (embeddings differ in scale by orders of
    magnitude between models and poolings); lbfgs, C=1, so the result is deterministic.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    predicted = probe.fit(train_x, list(train_y)).predict(test_x)
    return {"accuracy": float(accuracy_score(list(test_y), predicted)),
            "macro_f1": float(f1_score(list(test_y), predicted, average="macro"))}


def kmeans_v_measure(x: np.ndarray, labels, seed: int = 0) -> dict[str, float]:
    """V-measure (the arithmetic-mean NMI) and adjusted Rand index of k-means (k = number of labels, 10 seeded
    restarts) on the rows of `x` L2-normalised, against `labels`."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, v_measure_score

    labels = list(labels)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    clusters = KMeans(n_clusters=len(set(labels)), n_init=10, random_state=seed).fit_predict(x)
    return {"v_measure": float(v_measure_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters))}


def retrieval_scores(similarity: np.ndarray, relevant, k: int = 10) -> dict[str, float]:
    """nDCG@k, MRR@k and recall@k for `similarity` `[queries, documents]` where query i has the one relevant
    document relevant[i]. A document that ties the relevant one ranks ahead of it (constant embeddings score 0)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    relevant = np.asarray(relevant)
    target = similarity[np.arange(len(relevant)), relevant][:, None]
    rank = (similarity >= target).sum(axis=1)  # 1 = first; the relevant document counts itself
    hit = rank <= k
    return {f"ndcg@{k}": float(np.where(hit, 1.0 / np.log2(rank + 1), 0.0).mean()),
            f"mrr@{k}": float(np.where(hit, 1.0 / rank, 0.0).mean()),
            f"recall@{k}": float(hit.mean())}
