"""``llm2comp recipe``: a recipe's stages in order on one model in memory, then the quality suite."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..evaluation import evaluate_suite, format_table, write_result
from . import modeling
from .config import TrainConfig
from .distributed import is_main
from .trainer import train

__all__ = ["run_recipe"]


def run_recipe(configs: list[TrainConfig], evaluate: bool = True) -> dict | None:
    """Train `configs` (from `load_recipe`) in order; each stage continues from the previous one's weights in
    memory (what loading its output directory gives). With `evaluate`, score the final model, its base model's
    mean and last pooling and TF-IDF on the quality suite, print the table and write
    ``<recipe output>/quality.json``; returns that result (None without `evaluate`)."""
    start = time.perf_counter()
    torch.manual_seed(configs[0].seed)
    model = modeling.load_model(configs[0])
    for cfg in configs:
        records = train(cfg, model=model)
        if is_main():  # no records: a resumed stage that had already finished
            losses = f"loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}" if records else "finished before"
            print(f"{cfg.stage}: {losses}; model in {cfg.output} ({time.perf_counter() - start:.0f} s so far)",
                  flush=True)
    if not (evaluate and is_main()):
        return None
    result = evaluate_suite(model.eval(), log=print)
    print(format_table(result))
    path = write_result(result, Path(configs[-1].output).parent / "quality.json", model=configs[-1].output,
                        train_s=round(time.perf_counter() - start - result["wall_s"], 1))
    print(f"quality suite: {path}")
    return result
