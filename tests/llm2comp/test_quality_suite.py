"""The quality suite: its loaders' fixed sizes, its metrics against sklearn / hand-computed values, oracle and
random embeddings on the real tasks, `evaluate_suite` and ``llm2comp eval`` on a tiny model."""

import json
import shutil
import zlib
from collections import Counter

import numpy as np
import pytest

from llm2comp import cli
from llm2comp.data import load_fortunes, load_gcide, load_manpages
from llm2comp.data.labeled import FORTUNE_TOPICS, GCIDE_FIELDS
from llm2comp.data.manpages import roff_text
from llm2comp.evaluation import (
    evaluate_suite,
    format_table,
    kmeans_v_measure,
    linear_probe,
    load_tasks,
    retrieval_scores,
)

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None,
                                reason="the fortunes, GCIDE and man page tasks come from Debian packages")


@pytest.fixture(scope="module")
def tasks():
    return {t.name: t for t in load_tasks()}


def test_fortunes_sizes_and_labels():
    data = load_fortunes()
    assert len(data.texts) == 320 == len(set(data.texts))
    assert Counter(data.labels) == {t: 40 for t in FORTUNE_TOPICS}
    assert Counter(zip(data.labels, data.split)) == {(t, s): 20 for t in FORTUNE_TOPICS for s in ("train", "test")}
    assert all(40 <= len(t) <= 240 for t in data.texts)


def test_gcide_sizes_and_labels():
    data = load_gcide()
    assert len(data.texts) == 200 == len(set(data.texts))
    assert Counter(data.labels) == {f.rstrip("."): 20 for f in GCIDE_FIELDS}
    assert not any("WordNet" in t or "1913 Webster" in t for t in data.texts)


def test_manpages_sizes():
    data = load_manpages()
    assert len(data.queries) == len(data.documents) == len(set(data.documents)) == len(set(data.queries)) == 160
    assert data.relevant == list(range(160))
    assert all(80 <= len(d) <= 320 and "\\f" not in d for d in data.documents)


def test_roff_text():
    lines = [".\\\" a comment", "The", ".BR strtok ()", "function breaks \\fIstr\\fP into", ".I tokens", ".PP"]
    assert roff_text(lines) == "The strtok() function breaks str into tokens"


def test_retrieval_scores_by_hand():
    similarity = np.array([[0.9, 0.1, 0.5],    # relevant 0 ranks 1st
                           [0.8, 0.2, 0.3],    # relevant 1 ranks 3rd
                           [0.4, 0.4, 0.1]])   # relevant 2 ranks 3rd
    scores = retrieval_scores(similarity, [0, 1, 2], k=2)
    assert scores == pytest.approx({"ndcg@2": 1 / 3, "mrr@2": 1 / 3, "recall@2": 1 / 3})
    ranked = retrieval_scores(similarity, [0, 2, 1], k=10)  # ranks 1, 2, 2 (a tie counts against)
    assert ranked["ndcg@10"] == pytest.approx((1 + 2 / np.log2(3)) / 3)
    assert ranked["mrr@10"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert retrieval_scores(np.ones((3, 3)), [0, 1, 2])["mrr@10"] == pytest.approx(1 / 3)


def test_linear_probe_and_kmeans_match_sklearn():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    x = np.eye(4)[labels] * 3 + rng.normal(size=(120, 4)) * 0.2
    assert linear_probe(x[::2], labels[::2], x[1::2], labels[1::2]) == {"accuracy": 1.0, "macro_f1": 1.0}
    clustered = kmeans_v_measure(x, labels)
    assert clustered["v_measure"] == pytest.approx(1.0) and clustered["ari"] == pytest.approx(1.0)
    from sklearn.cluster import KMeans
    noisy = rng.normal(size=(120, 8))
    clusters = KMeans(4, n_init=10, random_state=0).fit_predict(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
    assert kmeans_v_measure(noisy, labels)["v_measure"] == pytest.approx(normalized_mutual_info_score(labels, clusters))


def _oracle(task):
    """Embeds a text as the one-hot of its label (labelled tasks) or of its query / document index (retrieval)."""
    data = task.data
    if hasattr(data, "labels"):
        names = sorted(set(data.labels))
        row = {t: names.index(label) for t, label in zip(data.texts, data.labels)}
    else:
        row = {**{q: data.relevant[i] for i, q in enumerate(data.queries)},
               **{d: i for i, d in enumerate(data.documents)}}
    size = max(row.values()) + 1
    return lambda texts: np.eye(size)[[row[t] for t in texts]]


def _random(texts):
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=64) for t in texts])


@pytest.mark.parametrize("name", ["fortunes", "gcide", "manpages"])
def test_oracle_scores_one_and_random_scores_near_chance(tasks, name):
    task = tasks[name]
    assert task.score(_oracle(task))[task.metric] == pytest.approx(1.0)
    # chance: 1 of 8 topics; V-measure of random clusters of 200 texts into 10 is about 0.15 (its ARI about 0);
    # a random rank among 160 documents gives nDCG@10 about 0.02
    chance = {"fortunes": 1 / 8, "gcide": 0.15, "manpages": 0.02}[name]
    scores = task.score(_random)
    assert scores[task.metric] < chance + 0.1 and scores.get("ari", 0) < 0.05


class _FixedEncoder:
    """A sentence-transformers style encoder with fixed random vectors per text."""

    def encode(self, texts, batch_size):
        return _random(texts)[:, :16]


def test_evaluate_suite_rows_and_table(tasks):
    result = evaluate_suite(_FixedEncoder(), list(tasks.values()))
    assert [r["row"] for r in result["rows"]] == ["model", "tfidf"]  # no base model rows for a non-LLM2Comp
    tfidf = result["rows"][1]
    assert tfidf["main"]["manpages"] > 0.5 and tfidf["main"]["fortunes"] > 0.3  # lexical overlap is real signal
    assert tfidf["average"] == pytest.approx(np.mean(list(tfidf["main"].values())))
    assert result["tasks"]["fortunes"]["sizes"] == {"train": 160, "test": 160, "classes": 8}
    assert {"command", "date", "git_commit", "machine"} <= set(result["environment"])
    table = format_table(result).splitlines()
    assert table[0].split()[:3] == ["row", "lee", "r"] and len(table) == 3
    with pytest.raises(ValueError, match="pooling"):
        evaluate_suite(_FixedEncoder(), list(tasks.values()), pooling="mean")


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown nope; choose from lee, fortunes"):
        load_tasks("lee,nope")


def test_base_rows_of_an_untrained_and_a_trained_model(tiny_encoder, tasks):
    small = [tasks["lee"], tasks["gcide"]]
    untrained = evaluate_suite(tiny_encoder, small, batch_size=64)
    assert [r["row"] for r in untrained["rows"]] == ["model memory", "base mean", "base last", "tfidf"]
    import torch
    with torch.no_grad():
        for name, p in tiny_encoder.named_parameters():
            if "lora_B" in name:
                p.normal_()
    trained = evaluate_suite(tiny_encoder, small, batch_size=64)  # its base is reloaded from base_reference
    by_row = {r["row"]: r["main"] for r in trained["rows"]}
    assert by_row["base mean"] == {r["row"]: r["main"] for r in untrained["rows"]}["base mean"]
    assert by_row["model memory"] != {r["row"]: r["main"] for r in untrained["rows"]}["model memory"]


def test_eval_command_end_to_end(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert cli.main(["eval", "--model", str(tiny_dirs["qwen2"]), "--device", "cpu", "--batch-size", "64",
                     "--tasks", "lee,fortunes,gcide,manpages", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("row ")))
    assert [line.split()[0:2] for line in lines[header + 1:header + 5]] == [
        ["model", "memory"], ["base", "mean"], ["base", "last"], ["tfidf", lines[header + 4].split()[1]]]
    saved = json.loads(out.read_text())
    assert saved["name"] == tiny_dirs["qwen2"].name and set(saved["tasks"]) == {"lee", "fortunes", "gcide", "manpages"}
    assert all(set(r["main"]) == set(saved["tasks"]) for r in saved["rows"])


def test_eval_command_rejects_an_unknown_task_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    assert cli.main(["eval", "--tasks", "lee,sentiment"]) == 2
    assert "unknown sentiment" in capsys.readouterr().err
