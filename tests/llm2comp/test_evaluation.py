import numpy as np
import pytest

from llm2comp.data import lee_background_documents, load_lee
from llm2comp.evaluation import evaluate_lee, pearson, spearman


def test_lee_data():
    bench = load_lee()
    assert len(bench.documents) == 50 and len(bench.pairs) == 1225 == len(bench.ratings)
    assert all(i < j for i, j in bench.pairs) and all(0 <= r <= 1 for r in bench.ratings)
    assert len(lee_background_documents()) == 300


def test_lee_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_lee(tmp_path)


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 200).astype(float), rng.normal(size=200)  # ties in x
    y = y + 0.3 * x
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


class _Oracle:
    """Embeds each Lee document as its row of the human similarity matrix: a strong, known signal."""

    def __init__(self, bench):
        n = len(bench.documents)
        sim = np.eye(n)
        for (i, j), r in zip(bench.pairs, bench.ratings):
            sim[i, j] = sim[j, i] = r
        self.rows = {d: sim[k] for k, d in enumerate(bench.documents)}

    def encode(self, texts, batch_size):
        return np.stack([self.rows[t] for t in texts])


def test_evaluate_lee_scores_a_known_signal():
    scores = evaluate_lee(_Oracle(load_lee()))
    assert scores["pearson"] > 0.8 and scores["spearman"] > 0.5


def test_evaluate_lee_on_tiny_encoder(tiny_encoder):
    scores = {p: evaluate_lee(tiny_encoder, pooling=p, batch_size=25) for p in ("memory", "mean")}
    assert all(-1 <= s[k] <= 1 for s in scores.values() for k in ("pearson", "spearman"))
    assert scores["memory"] != scores["mean"]
