"""The tasks of the quality suite: real English text, fixed sizes, one main score each.

A task holds its loaded data and scores an ``embed(texts) -> float [n, D]`` function (`Task.score`); it also
names the texts to embed (`Task.texts`, at `Task.max_length` tokens) and those a TF-IDF baseline is fitted on
(`Task.tfidf_corpus`). `TASKS` maps each name to its loader; `load_tasks` checks the names and loads them.

| name | kind | data | main score |
| lee | similarity | Lee et al. 2005: 50 news documents, 1225 rated pairs | Pearson (and Spearman) |
| fortunes | classification | Debian ``fortunes``: 8 topics x 40 (20 train, 20 test) | linear probe accuracy |
| gcide | clustering | Debian ``dict-gcide``, 1913 Webster: 10 fields x 20 | k-means V-measure |
| manpages | retrieval | Debian ``manpages(-dev)``: 160 summaries -> 160 paragraphs | nDCG@10 |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.labeled import LabeledTexts, load_fortunes, load_gcide
from ..data.lee import LeeBenchmark, load_lee
from ..data.manpages import ManPageRetrieval, load_manpages
from .metrics import kmeans_v_measure, linear_probe, pearson, retrieval_scores, spearman

__all__ = ["TASKS", "Task", "evaluate_lee", "lee_task", "load_tasks"]

Embed = Callable[[list[str]], np.ndarray]
SHORT_TEXT_TOKENS = 128  # every task but Lee: its texts are under 320 characters


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Task:
    """One task: `name`, `kind`, `metric` (the key of its main score), `source` and `license` of its data."""

    name: str
    kind: str
    metric: str
    source: str
    license: str
    max_length: int = SHORT_TEXT_TOKENS
    data: object = field(default=None, repr=False)

    def texts(self) -> list[str]:
        """Every text the task embeds (each once)."""
        raise NotImplementedError

    def tfidf_corpus(self) -> list[str]:
        """The texts a TF-IDF baseline's vocabulary and idf come from."""
        return self.texts()

    def sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def score(self, embed: Embed) -> dict[str, float]:
        """The task's scores (`metric` among them) for ``embed(texts) -> [n, D]``."""
        raise NotImplementedError


class SimilarityTask(Task):
    """Cosine similarity of document pairs against human ratings (`LeeBenchmark`)."""

    data: LeeBenchmark

    def texts(self):
        return list(self.data.documents)

    def sizes(self):
        return {"documents": len(self.data.documents), "pairs": len(self.data.pairs)}

    def score(self, embed):
        emb = _normalized(embed(self.data.documents))
        i, j = np.array(self.data.pairs).T
        cosine = (emb[i] * emb[j]).sum(axis=1)
        return {"pearson": pearson(cosine, self.data.ratings), "spearman": spearman(cosine, self.data.ratings)}


def _rows(data: LabeledTexts, split: str) -> tuple[list[str], list[str]]:
    keep = [k for k, s in enumerate(data.split) if s == split]
    return [data.texts[k] for k in keep], [data.labels[k] for k in keep]


class ClassificationTask(Task):
    """A linear probe (`linear_probe`) trained on the train texts' embeddings, scored on the test texts."""

    data: LabeledTexts

    def texts(self):
        return list(self.data.texts)

    def tfidf_corpus(self):
        return _rows(self.data, "train")[0]

    def sizes(self):
        return {"train": self.data.split.count("train"), "test": self.data.split.count("test"),
                "classes": len(set(self.data.labels))}

    def score(self, embed):
        (train_x, train_y), (test_x, test_y) = _rows(self.data, "train"), _rows(self.data, "test")
        return linear_probe(_normalized(embed(train_x)), train_y, _normalized(embed(test_x)), test_y)


class ClusteringTask(Task):
    """k-means on the embeddings against the labels (`kmeans_v_measure`)."""

    data: LabeledTexts

    def texts(self):
        return list(self.data.texts)

    def sizes(self):
        return {"texts": len(self.data.texts), "clusters": len(set(self.data.labels))}

    def score(self, embed):
        return kmeans_v_measure(embed(self.data.texts), self.data.labels)


class RetrievalTask(Task):
    """Each query against the whole document collection by cosine similarity (`retrieval_scores`)."""

    data: ManPageRetrieval

    def texts(self):
        return list(self.data.queries) + list(self.data.documents)

    def tfidf_corpus(self):
        return list(self.data.documents)

    def sizes(self):
        return {"queries": len(self.data.queries), "documents": len(self.data.documents)}

    def score(self, embed):
        similarity = _normalized(embed(self.data.queries)) @ _normalized(embed(self.data.documents)).T
        return retrieval_scores(similarity, self.data.relevant, k=10)


def lee_task(data_dir: str | Path | None, bench: LeeBenchmark | None = None) -> Task:
    """The Lee similarity task, of `bench` when given (else read from `data_dir`)."""
    return SimilarityTask(
        "lee", "similarity", "pearson", max_length=512, data=bench if bench is not None else load_lee(data_dir),
        source="Lee, Pincombe & Welsh (2005) document similarity data, the copy in the gensim wheel (PyPI)",
        license="gensim: LGPL-2.1-or-later; the data: published for research by its authors")


def _fortunes(_) -> Task:
    return ClassificationTask(
        "fortunes", "classification", "accuracy", data=load_fortunes(),
        source="Debian package fortunes (fortune-mod 1.99.1 data files), one file per topic",
        license="BSD-3-Clause (fortune-mod)")


def _gcide(_) -> Task:
    return ClusteringTask(
        "gcide", "clustering", "v_measure", data=load_gcide(),
        source="Debian package dict-gcide (GCIDE 0.48), 1913 Webster definitions by field label",
        license="GPL-2.0-or-later")


def _manpages(_) -> Task:
    return RetrievalTask(
        "manpages", "retrieval", "ndcg@10", data=load_manpages(),
        source="Debian packages manpages, manpages-dev (Linux man-pages 6.03): NAME summary -> DESCRIPTION",
        license="per page, mostly Linux-man-pages-copyleft (also GPL-2.0-or-later, BSD, MIT)")


TASKS: dict[str, Callable[[str | Path | None], Task]] = {
    "lee": lee_task, "fortunes": _fortunes, "gcide": _gcide, "manpages": _manpages}


def load_tasks(names: Sequence[str] | str | None = None, lee_dir: str | Path | None = None) -> list[Task]:
    """The named tasks (a list or a comma-separated string; default all of `TASKS`), loaded; `lee_dir`: where the
    Lee files are (default: `llm2comp.data.lee.lee_dir`)."""
    if names is None:
        names = list(TASKS)
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"tasks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    return [TASKS[n](lee_dir) for n in dict.fromkeys(names)]


def evaluate_lee(model, data_dir: str | Path | None = None, pooling: str | None = None,
                 batch_size: int = 8, bench: LeeBenchmark | None = None) -> dict[str, float]:
    """Pearson and Spearman correlation of embedding cosine similarity with the human ratings (1225 pairs).

    `model` is an `LLM2Comp` (``pooling`` applies to it) or anything with a sentence-transformers
    style ``encode(texts, batch_size=...)`` (then `pooling` must be None). `bench`: the benchmark already
    loaded (`load_lee`), else it is read from `data_dir`.
    """
    options = {"batch_size": batch_size} if pooling is None else {"batch_size": batch_size, "pooling": pooling}
    return lee_task(data_dir, bench).score(lambda texts: model.encode(texts, **options))
