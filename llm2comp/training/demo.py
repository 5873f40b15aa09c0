"""``llm2comp demo``: the whole method in miniature on real data.

The default model (SmolLM2-135M, from PyPI) is scored on the Lee similarity benchmark, trained
briefly with stage 1 (compression, kl objective) and stage 2 (SimCSE, attention dropout 0.2, a fresh
LoRA on the folded stage-1 one, memory rows frozen) on the 300 Lee background documents (293 distinct
ones for SimCSE), and scored after each stage, beside the untrained model's mean pooling and TF-IDF
measured in the same run. Each stage writes its output directory (LLM2Comp format, checkpoints,
log.jsonl) under ``--output``; stage 2 continues from stage 1's weights in memory, which is what
loading stage 1's directory would give, without loading the model twice. `demo_configs` is the
recipe, shared with the ablation benchmark (`benchmarks/quality_ablation.py`).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

from ..data import lee_background_documents, load_lee
from ..default_model import DEFAULT_MODEL
from ..evaluation import evaluate_lee
from ..evaluation.suite import tfidf_embedder
from ..evaluation.tasks import lee_task
from ..model import LLM2Comp
from .config import DEMO_DEFAULTS, TrainConfig, chain_stages
from .trainer import train

__all__ = ["demo_configs", "run_demo", "tfidf_lee"]

# Short runs need larger steps than the paper's full-length ones (1e-4 / 3e-5) to move at all.
DEMO_LR = {"compress": 5e-4, "unsupervised": 3e-4}
STAGE_NAMES = {"compress": "+ stage 1: compression (kl)", "unsupervised": "+ stage 2: SimCSE"}


def demo_configs(output: str | Path, corpus: str | Path, *, compress_steps: int, unsupervised_steps: int,
                 batch_size: int, max_length: int, seed: int = 0, base: str = DEFAULT_MODEL,
                 **overrides) -> list[TrainConfig]:
    """The demo's stages on `corpus`: compress (kl) then unsupervised, each writing ``output/<stage>``; a stage
    with 0 steps is left out. `overrides`: options for both stages (``objective``: stage 1 only)."""
    steps = {"compress": compress_steps, "unsupervised": unsupervised_steps}
    stages = {stage: {"max_steps": n, "lr": DEMO_LR[stage],
                      **{k: v for k, v in overrides.items() if stage == "compress" or k != "objective"}}
              for stage, n in steps.items() if n != 0}  # a negative count is refused by name (load_config)
    return chain_stages({"model": base, "data": str(corpus), "output": str(output), "batch_size": batch_size,
                         "max_length": max_length, "warmup_ratio": 0.1, "save_every": 10_000, "overwrite": True,
                         "seed": seed}, stages)


def tfidf_lee(bench) -> dict[str, float] | None:
    """The quality suite's TF-IDF baseline on the Lee benchmark `bench`: Pearson and Spearman; None without
    scikit-learn."""
    if importlib.util.find_spec("sklearn") is None:
        return None
    task = lee_task(None, bench)
    return task.score(tfidf_embedder(task))


def _plot(rows: list[tuple[str, dict]], base_name: str, path: Path) -> bool:
    """The memory-token rows as lines over the stages, the mean-pooling baseline (rows[0]) as dashed levels."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.4))
    (baseline_name, baseline), stages = rows[0], rows[1:]
    names = [name.split(":")[0].split(" (")[0] for name, _ in stages]
    for metric, color in (("pearson", "C0"), ("spearman", "C1")):
        ax.plot(names, [scores[metric] for _, scores in stages], marker="o", color=color, label=metric)
        ax.axhline(baseline[metric], color=color, linestyle="--", linewidth=1,
                   label=f"{metric}, {baseline_name.split(' (')[0]}")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("correlation with human ratings")
    ax.set_title(f"Lee benchmark (1225 pairs), {Path(base_name).name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_demo(output: str = DEMO_DEFAULTS["output"], device: str | None = None, compress_steps: int | None = None,
             unsupervised_steps: int | None = None, batch_size: int | None = None, max_length: int | None = None,
             plot: bool = True, model: str = DEFAULT_MODEL, seed: int = 0) -> list[tuple[str, dict]]:
    """Run the demo on base `model` and print the table; returns ``[(row name, {"pearson", "spearman"})]``."""
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pick = 0 if device.type == "cuda" else 1

    def size(value, key):
        return value if value is not None else DEMO_DEFAULTS[key][pick]

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "lee_background.txt"
    corpus.write_text("\n".join(lee_background_documents()) + "\n", encoding="utf-8")
    configs = demo_configs(out, corpus, compress_steps=size(compress_steps, "compress_steps"),
                           unsupervised_steps=size(unsupervised_steps, "unsupervised_steps"),
                           batch_size=size(batch_size, "batch_size"), max_length=size(max_length, "max_length"),
                           seed=seed, base=model)

    torch.manual_seed(seed)
    base_name, model = model, LLM2Comp.from_pretrained(model, device=device)
    print(f"model {base_name} on {device}, loaded in {time.perf_counter() - start:.0f}s", flush=True)
    bench = load_lee()
    # The untrained model's mean pooling is the baseline the memory tokens have to learn to beat.
    rows = [("base, mean pooling (baseline)", evaluate_lee(model, pooling="mean", batch_size=16, bench=bench)),
            ("base, memory tokens (untrained)", evaluate_lee(model, batch_size=16, bench=bench))]
    print(f"  Lee before training: pearson {rows[1][1]['pearson']:.4f} (mean pooling {rows[0][1]['pearson']:.4f})",
          flush=True)
    for cfg in configs:
        records = train(cfg, model=model)
        rows.append((STAGE_NAMES[cfg.stage], evaluate_lee(model, batch_size=16, bench=bench)))
        print(f"  {cfg.stage}: {cfg.max_steps} steps, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; "
              f"Lee pearson {rows[-1][1]['pearson']:.4f}", flush=True)
    final, baseline, tfidf = rows[-1][1], rows[0][1], tfidf_lee(bench)
    if tfidf is not None:
        rows.append(("TF-IDF", tfidf))

    print(f"\nLee document similarity (Pearson / Spearman over 1225 pairs), seed {seed}, "
          f"{time.perf_counter() - start:.0f}s total")
    width = max(len(name) for name, _ in rows)
    print(f"{'model':<{width}}  {'pearson':>8}  {'spearman':>8}")
    for name, scores in rows:
        print(f"{name:<{width}}  {scores['pearson']:>8.4f}  {scores['spearman']:>8.4f}")
    if tfidf is None:
        print("(TF-IDF row: pip install scikit-learn)")
    beats = all(final[k] > baseline[k] for k in ("pearson", "spearman"))
    print(f"the trained memory tokens {'beat' if beats else 'do NOT beat'} the base model's mean pooling "
          f"(pearson {final['pearson'] - baseline['pearson']:+.4f}, spearman "
          f"{final['spearman'] - baseline['spearman']:+.4f})")
    if plot and _plot(rows[:len(configs) + 2], base_name, out / "lee_demo.png"):
        print(f"plot: {out / 'lee_demo.png'}")
    return rows
