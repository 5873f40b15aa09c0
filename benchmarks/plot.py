"""Plot a benchmark result file: time per shape, one line per provider, one panel per (op, mode, dtype)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_results(path: Path | str) -> Path | None:
    """Write `<result>.png` beside the JSON; None when matplotlib is missing or nothing was timed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "ms" in r]
    if not rows:
        return None
    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        panels.setdefault((r.get("op"), r.get("mode"), r.get("dtype")), []).append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, panel) in zip(axes[0], panels.items()):
        shapes = list(dict.fromkeys(str(r.get("shape")) for r in panel))
        for provider in dict.fromkeys(r.get("provider") for r in panel):
            pts = sorted((shapes.index(str(r.get("shape"))), r["ms"]) for r in panel if r.get("provider") == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(" / ".join(str(k) for k in key if k), fontsize=9)
        ax.legend(fontsize=7)
    env = data.get("environment", {})
    fig.suptitle(f"{path.stem} on {env.get('device')} (torch {env.get('torch')})", fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
