"""The paper's central claim and the training hand-off, at small scale, over seeds.

``python -m benchmarks.quality_ablation run [--seeds 0 1 2] [--only NAME,...] [--workers 2] [--suite]``
trains SmolLM2-135M with the demo's recipe (`llm2comp.training.demo.demo_configs`: Lee background documents,
stage 1 then SimCSE) at a smaller budget, once per variant and seed, each run in its own process (one torch
thread each), and appends one JSON line per run to ``benchmarks/results/quality_ablation.jsonl`` (runs already
there are skipped, so an interrupted sweep continues). Every run scores Lee; with ``--suite``, the whole quality
suite too. The base model's mean and last pooling and TF-IDF are measured once, as the run ``base``.
``python -m benchmarks.quality_ablation render`` turns the file into docs/quality_ablation.md (mean ± std over
seeds).

Variants: stage 1 (kl, nll or reconstruct) then SimCSE, against SimCSE alone with the same number of optimizer
steps; and the kl recipe with each hand-off choice of the paper undone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "quality_ablation.jsonl"
DOC = HERE.parent / "docs" / "quality_ablation.md"

# The ablation's budget: smaller than the demo's (6 + 24 steps at 128 tokens) so that 27 runs fit an hour of
# a 2-core CPU.
BUDGET = {"compress_steps": 6, "unsupervised_steps": 16, "batch_size": 8, "max_length": 64}
VARIANTS = {  # name -> (what it is, options over the recipe)
    "kl + SimCSE": ("the paper's recipe (every hand-off choice on)", {}),
    "SimCSE alone": ("no stage 1; its steps go to SimCSE", {"compress_steps": 0, "unsupervised_steps": 22}),
    "nll + SimCSE": ("stage 1 objective nll", {"objective": "nll"}),
    "reconstruct + SimCSE": ("stage 1 objective reconstruct", {"objective": "reconstruct"}),
    "no attention dropout": ("SimCSE's noise only LoRA dropout", {"attention_dropout": 0.0}),
    "one LoRA": ("stage 1's LoRA trained on, not folded and restarted", {"fresh_lora": False}),
    "memory rows trained in stage 2": ("not frozen after stage 1", {"freeze_memory": False}),
    "no BOS in the encoder": ("the encoder row starts with the text", {"encoder_bos": False}),
    "memory rows start as the mean": ("all 8 rows one vector", {"memory_init": "mean"}),
}


def _run_one(variant: str, seed: int, suite: bool) -> dict:
    """Train and score one (variant, seed) in this process; the record written to the results file."""
    import torch

    from llm2comp.data import lee_background_documents
    from llm2comp.evaluation import evaluate_lee, evaluate_suite
    from llm2comp.training import modeling, train
    from llm2comp.training.demo import demo_configs

    start = time.perf_counter()
    options = {**BUDGET, **VARIANTS[variant][1]}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "lee_background.txt"
        corpus.write_text("\n".join(lee_background_documents()) + "\n", encoding="utf-8")
        configs = demo_configs(Path(tmp) / "out", corpus, seed=seed, **options)
        torch.manual_seed(seed)
        model = modeling.load_model(configs[0])
        losses = [train(cfg, model=model, progress=False)[-1]["loss"] for cfg in configs]
    record = {"variant": variant, "seed": seed, "options": options, "final_losses": losses,
              "train_s": round(time.perf_counter() - start, 1), "lee": evaluate_lee(model, batch_size=16)}
    if suite:
        record["suite"] = evaluate_suite(model, baselines=False)["rows"][0]
    return record


def _run_base() -> dict:
    from llm2comp import LLM2Comp
    from llm2comp.evaluation import evaluate_suite

    result = evaluate_suite(LLM2Comp.from_pretrained(), pooling=["memory"])
    return {"variant": "base", "seed": None, "rows": result["rows"], "tasks": result["tasks"],
            "environment": result["environment"]}


def _done(path: Path) -> set[tuple[str, int | None]]:
    if not path.exists():
        return set()
    return {(r["variant"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def run(seeds: list[int], variants: list[str], workers: int, suite: bool, path: Path) -> None:
    jobs = [("base", None)] * suite + [(v, s) for s in seeds for v in variants]
    jobs = [j for j in jobs if j not in _done(path)]
    print(f"{len(jobs)} runs to do ({workers} at a time), results in {path}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def launch(job):
        variant, seed = job
        cmd = [sys.executable, "-m", "benchmarks.quality_ablation", "one", variant, str(seed)]
        cmd += ["--suite"] * suite
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
        if done.returncode != 0:
            print(f"FAILED {variant} seed {seed}:\n{done.stderr[-3000:]}", flush=True)
            return
        line = done.stdout.strip().splitlines()[-1]
        with path.open("a") as fh:  # one line, appended whole
            fh.write(line + "\n")
        record = json.loads(line)
        lee = record.get("lee")
        print(f"{variant} seed {seed}: " + (f"Lee {lee['pearson']:.4f} / {lee['spearman']:.4f}, "
                                           f"{record['train_s']:.0f} s" if lee else "done"), flush=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(launch, jobs))


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def render(path: Path, doc: Path) -> str:
    """docs/quality_ablation.md from the results file: one row per variant, mean ± std over its seeds."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    base = next((r for r in records if r["variant"] == "base"), None)
    runs = [r for r in records if r["variant"] != "base"]
    with_suite = all("suite" in r for r in runs)
    tasks = list(runs[0]["suite"]["main"]) if with_suite and runs else []
    head = ["variant", "seeds", "Lee Pearson", "Lee Spearman"] + [f"{t}" for t in tasks if t != "lee"]
    head += ["suite average"] * with_suite
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, (what, _) in VARIANTS.items():
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        cells = [f"{variant} ({what})", ", ".join(str(r["seed"]) for r in mine)]
        cells += [_mean_std([r["lee"][k] for r in mine]) for k in ("pearson", "spearman")]
        if with_suite:
            cells += [_mean_std([r["suite"]["main"][t] for r in mine]) for t in tasks if t != "lee"]
            cells.append(_mean_std([r["suite"]["average"] for r in mine]))
        lines.append("| " + " | ".join(cells) + " |")
    if base is not None:
        for row in base["rows"]:
            lee = row["scores"]["lee"]
            cells = [f"untrained: {row['row']}", "-", f"{lee['pearson']:.3f}", f"{lee['spearman']:.3f}"]
            if with_suite:
                cells += [f"{row['main'][t]:.3f}" for t in tasks if t != "lee"] + [f"{row['average']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
    budget = ", ".join(f"{k} {v}" for k, v in BUDGET.items())
    text = "\n".join([
        "# Ablation: stage 1 and the training hand-off at small scale", "",
        "Rendered by `python -m benchmarks.quality_ablation render` from "
        "`benchmarks/results/quality_ablation.jsonl` (written by `python -m benchmarks.quality_ablation run`). "
        f"SmolLM2-135M on CPU, the demo's recipe on the 300 Lee background documents at a smaller budget ({budget}); "
        "mean ± sample std over the seeds listed. Scores of the memory-token embedding; the untrained rows are "
        "measured once (no training, no seed).", "", *lines, ""])
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_ablation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="train and score the variants over seeds (skips runs already in the file)")
    go.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    go.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    go.add_argument("--workers", type=int, default=2, help="runs at a time, one torch thread each")
    go.add_argument("--suite", action="store_true", help="score each run on the whole quality suite, not Lee only")
    go.add_argument("--out", type=Path, default=RESULTS)
    one = sub.add_parser("one", help="one run in this process; prints its JSON record")
    one.add_argument("variant", choices=(*VARIANTS, "base"))
    one.add_argument("seed")
    one.add_argument("--suite", action="store_true")
    show = sub.add_parser("render", help="write docs/quality_ablation.md from the results file")
    show.add_argument("--results", type=Path, default=RESULTS)
    show.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    if args.command == "run":
        variants = args.only.split(",") if args.only else list(VARIANTS)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            parser.error(f"--only: unknown variants {unknown}; valid: {list(VARIANTS)}")
        run(args.seeds, variants, args.workers, args.suite, args.out)
    elif args.command == "one":
        record = _run_base() if args.variant == "base" else _run_one(args.variant, int(args.seed), args.suite)
        print(json.dumps(record))
    else:
        print(render(args.results, args.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
