"""The quality suite: every task of `llm2comp.evaluation.tasks` on one model, with baselines measured in the
same run, as a result dict (`evaluate_suite`), a table (`format_table`) and a JSON file (`write_result`).

Rows: the model under test (its pooling, or the ones asked for); the base model's ``mean`` and ``last`` pooling
(the untrained model: the model itself when its LoRA adapters are untouched, else its base reloaded); TF-IDF
(scikit-learn, sublinear tf, English stop words, fitted per task on `Task.tfidf_corpus`). Each distinct text
is embedded once per row and max_length.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .tasks import Task, load_tasks

__all__ = ["cpu_name", "environment", "evaluate_suite", "format_table", "git_commit", "tfidf_embedder",
           "write_result"]


def _encode_options(model, pooling: str | None, max_length: int, batch_size: int, show_progress_bar) -> dict:
    options = {"batch_size": batch_size}
    if hasattr(model, "memory_token_ids"):  # an LLM2Comp
        options.update(pooling=pooling, max_length=max_length, show_progress_bar=show_progress_bar)
    elif pooling is not None:
        raise ValueError(f"pooling={pooling!r} applies to an LLM2Comp model only, not to {type(model).__name__}")
    return options


def _model_embedder(model, tasks: list[Task], pooling: str | None, batch_size: int, show_progress_bar):
    """``embed_for(task)``: the task's embed function, over vectors computed here, each distinct text once."""
    tables = {}
    for max_length in sorted({t.max_length for t in tasks}):
        texts = list(dict.fromkeys(x for t in tasks if t.max_length == max_length for x in t.texts()))
        emb = np.asarray(model.encode(texts, **_encode_options(model, pooling, max_length, batch_size,
                                                               show_progress_bar)), dtype=np.float64)
        tables[max_length] = dict(zip(texts, emb))
    return lambda task: (lambda texts: np.stack([tables[task.max_length][x] for x in texts]))


def tfidf_embedder(task: Task):
    """``embed(texts) -> [n, V]`` of the TF-IDF baseline (sublinear tf, English stop words) fitted on the task's
    `Task.tfidf_corpus`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit(task.tfidf_corpus())
    return lambda texts: vectorizer.transform(texts).toarray()


def _untrained(model) -> bool:
    """Whether every LoRA B matrix of `model` is zero (as peft initialises them): its outputs are the base's."""
    return all(not p.detach().any() for n, p in model.named_parameters() if "lora_B" in n)


def _base_model(model, baseline_model):
    """The untrained model whose mean / last pooling are the baselines (None: `model` is no LLM2Comp)."""
    if baseline_model is not None and not isinstance(baseline_model, (str, Path)):
        return baseline_model
    if not hasattr(model, "memory_token_ids"):
        if baseline_model is not None:
            raise ValueError("baseline_model by name needs an LLM2Comp model under test")
        return None
    if baseline_model is None and _untrained(model):
        return model
    from ..model import LLM2Comp

    reference = dict(model.base_reference) if baseline_model is None else {"name_or_path": str(baseline_model)}
    if not reference.get("name_or_path"):
        raise ValueError("the model names no base model (base_reference); pass baseline_model")
    # rows laid out as the model under test reads them (BOS or not: it moves the base's mean pooling too)
    return LLM2Comp.from_pretrained(reference.pop("name_or_path"), num_memory_tokens=model.num_memory_tokens,
                                    device=model.device, prepend_bos=model.prepend_bos, **reference)


def _row(label: str, pooling: str | None, tasks: list[Task], embed_for, start: float) -> dict:
    scores = {t.name: t.score(embed_for(t)) for t in tasks}
    main = {t.name: scores[t.name][t.metric] for t in tasks}
    return {"row": label, "pooling": pooling, "scores": scores, "main": main,
            "average": float(np.mean(list(main.values()))), "seconds": round(time.perf_counter() - start, 2)}


def evaluate_suite(model, tasks: Sequence[str] | str | Sequence[Task] | None = None,
                   pooling: str | Sequence[str] | None = None, batch_size: int = 16, baselines: bool = True,
                   baseline_model=None, lee_dir: str | Path | None = None,
                   show_progress_bar: bool | None = None, log=None) -> dict:
    """Score `model` on the quality suite, with the baselines measured in the same call.

    model: an `LLM2Comp`, or anything with a sentence-transformers style ``encode(texts, batch_size=...)``
    (then `pooling` must be None and there are no base-model rows). tasks: names (list or ``"lee,gcide"``) or
    loaded `Task` objects; default every task. pooling: one or several of memory / mean / last (default the
    model's), a row each. baselines: add the base model's mean and last pooling and TF-IDF; baseline_model: the
    base (an LLM2Comp or a name to load; default: `model` itself when untrained, else its base_reference).
    Training loops that call this after every stage can pass ``baselines=False`` (the baselines do not change).
    log: a ``print``-like function told of each row as it finishes (default: silent).

    Returns ``{"tasks": {name: {kind, metric, sizes, source, license, max_length}}, "rows": [{row, pooling,
    scores: {task: {metric: float}}, main: {task: float}, average, seconds}], "environment": {...}, "wall_s"}``.
    """
    start = time.perf_counter()
    tasks = list(tasks) if tasks is not None and not isinstance(tasks, str) else tasks
    if not (tasks and all(isinstance(t, Task) for t in tasks)):
        tasks = load_tasks(tasks, lee_dir)
    poolings = [pooling] if pooling is None or isinstance(pooling, str) else list(pooling)
    log = log or (lambda *_: None)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        log(f"{row['row']:<16} average {row['average']:.4f} ({row['seconds']:.1f} s)")

    for p in poolings:
        t0 = time.perf_counter()
        label = f"model {p or getattr(model, 'pooling', '')}".strip()
        add(_row(label, p, tasks, _model_embedder(model, tasks, p, batch_size, show_progress_bar), t0))
    if baselines:
        base = _base_model(model, baseline_model)
        model_poolings = {p or getattr(model, "pooling", None) for p in poolings}
        for p in ("mean", "last") if base is not None else ():
            if base is model and p in model_poolings:
                continue  # the same numbers as a model row
            t0 = time.perf_counter()
            add(_row(f"base {p}", p, tasks, _model_embedder(base, tasks, p, batch_size, show_progress_bar), t0))
        t0 = time.perf_counter()
        add(_row("tfidf", None, tasks, tfidf_embedder, t0))
    return {"tasks": {t.name: {"kind": t.kind, "metric": t.metric, "sizes": t.sizes(), "source": t.source,
                               "license": t.license, "max_length": t.max_length} for t in tasks},
            "rows": rows, "environment": environment(model), "wall_s": round(time.perf_counter() - start, 1)}


_SHORT = {"pearson": "r", "spearman": "rho", "accuracy": "acc", "v_measure": "V", "ndcg@10": "nDCG@10"}


def format_table(result: dict) -> str:
    """The result's rows as a fixed-width table: each task's main score (Lee: Pearson and Spearman), the average
    of the main scores, and the row's seconds."""
    columns = []
    for name, info in result["tasks"].items():
        columns.append((f"{name} {_SHORT.get(info['metric'], info['metric'])}", name, info["metric"]))
        if info["metric"] == "pearson":
            columns.append((f"{name} rho", name, "spearman"))
    header = [f"{'row':<14}"] + [f"{c[0]:>{max(len(c[0]), 7)}}" for c in columns] + [f"{'average':>7}",
                                                                                     f"{'s':>6}"]
    lines = [" ".join(header)]
    for row in result["rows"]:
        cells = [f"{row['row']:<14}"] + [f"{row['scores'][task][key]:>{max(len(head), 7)}.4f}"
                                         for head, task, key in columns]
        lines.append(" ".join(cells + [f"{row['average']:>7.4f}", f"{row['seconds']:>6.1f}"]))
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name and core count."""
    info = Path("/proc/cpuinfo")
    name = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                 if line.startswith("model name")), None) if info.exists() else None
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def git_commit() -> str | None:
    """HEAD of the checkout llm2comp runs from (``-dirty`` when it has uncommitted changes), or None."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(model=None) -> dict:
    """Command line, date, git commit, machine (CPU model, torch threads) and versions, stored with each result."""
    import torch

    device = getattr(model, "device", None)
    return {"command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": os.environ.get("LLM2COMP_GIT_COMMIT") or git_commit(),
            "machine": cpu_name(), "device": str(device) if device is not None else None,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def write_result(result: dict, path: str | Path, **extra) -> Path:
    """`result` (and `extra` keys, e.g. the model's name) as indented JSON at `path` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, **result}, indent=1) + "\n")
    return path
