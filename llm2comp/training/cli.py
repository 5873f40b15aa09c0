"""``llm2comp train compress|unsupervised|supervised`` and ``llm2comp demo`` subcommands.

`add_train_parser` and `add_demo_parser` register them on the top-level ``llm2comp`` parser's
subparsers; each sets ``func`` to the function that runs the parsed namespace.
"""

from __future__ import annotations

import argparse
import sys

from .config import STAGES, ConfigError, add_config_arguments, config_from_args

__all__ = ["add_train_parser", "add_demo_parser", "add_recipe_parser"]

_STAGE_HELP = {
    "compress": "stage 1, compression pretraining: the frozen LLM continues each text from the memory "
                "states of its prefix (objective kl, nll or reconstruct)",
    "unsupervised": "stage 2, SimCSE: each text embedded twice with dropout, in-batch negatives",
    "supervised": "stage 3, contrastive on {query, positive, negatives, instruction?} jsonl rows with hard "
                  "and in-batch negatives (gathered across GPUs; --grad-cache for large batches)",
}


def _run_train(args: argparse.Namespace) -> int:
    from .distributed import is_main
    from .rows import DataError
    from .trainer import train  # heavy imports only when a stage actually runs

    try:
        cfg = config_from_args(args, args.stage)
        records = train(cfg)
    except (ConfigError, DataError, OSError) as exc:  # the message names the option, file or path at fault
        print(f"llm2comp train {args.stage}: {exc}", file=sys.stderr)
        return 2
    if records and is_main():  # every rank returns the records; one summary
        print(f"{cfg.stage}: {records[-1]['step']} steps, final loss {records[-1]['loss']:.4f}; model in {cfg.output}")
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` with one sub-command per stage. Multi-GPU: ``torchrun --nproc-per-node N -m llm2comp.cli
    train ...``; ``--batch-size`` is per process."""
    parser = subparsers.add_parser("train", help="train an LLM2Comp encoder (three stages)",
                                   description="Train one stage. Each stage starts from --model: a base model "
                                               "name/path, or the previous stage's --output directory.")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(STAGES) + "}")
    for stage in STAGES:
        sub = stages.add_parser(stage, help=_STAGE_HELP[stage], description=_STAGE_HELP[stage])
        add_config_arguments(sub, stage)
        sub.set_defaults(func=_run_train)
    return parser


def _run_recipe(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .recipe import run_recipe
    from .rows import DataError

    overrides = {k: v for k, v in (("output", args.output), ("overwrite", args.overwrite), ("resume", args.resume))
                 if v}  # the flags given
    try:
        configs = load_recipe(args.file, **overrides)
        run_recipe(configs, evaluate=not args.no_eval)
    except (ConfigError, DataError, OSError) as exc:
        print(f"llm2comp recipe: {exc}", file=sys.stderr)
        return 2
    return 0


def add_recipe_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``recipe``: the stages of a recipe file in order, then the quality suite."""
    parser = subparsers.add_parser(
        "recipe", help="train the stages of a recipe file in order (recipes/*.toml), then score the quality suite",
        description="Runs each stage table of a TOML recipe ([compress], [unsupervised], [supervised]; top-level "
                    "keys apply to every stage) into <output>/<stage>, each stage starting from the one before, "
                    "then scores the final model and its base on the quality suite (<output>/quality.json).")
    parser.add_argument("file", help="the recipe (TOML)")
    parser.add_argument("--output", default=None, help="the recipe's folder (default: the file's output key)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh where a stage's output holds a run")
    parser.add_argument("--resume", action="store_true", help="continue a killed recipe: each stage from its newest "
                        "checkpoint (a finished stage only reloads its weights)")
    parser.add_argument("--no-eval", action="store_true", help="skip the quality suite at the end")
    parser.set_defaults(func=_run_recipe)
    return parser


def _run_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(output=args.output, device=args.device, compress_steps=args.compress_steps,
             unsupervised_steps=args.unsupervised_steps, batch_size=args.batch_size, max_length=args.max_length,
             plot=not args.no_plot, model=args.model, seed=args.seed)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``demo``: the method in miniature on the Lee corpus, scored before and after."""
    from ..default_model import DEFAULT_MODEL
    from .config import DEMO_DEFAULTS

    parser = subparsers.add_parser(
        "demo", help="the whole method in miniature: short compression and SimCSE stages on the Lee background "
                     "corpus, Lee similarity benchmark before and after",
        description="Trains a base model (default: the embedded SmolLM2-135M) briefly with stage 1 (kl) and stage 2 "
                    "(SimCSE) on lee_background.cor, then prints the Lee benchmark (Pearson/Spearman) before "
                    "and after each stage. Sized for 6 min on a 2-core CPU (larger batches and texts on a GPU).")
    parser.add_argument("--output", default=DEMO_DEFAULTS["output"], help="directory for the stages' models, "
                        f"logs and the plot (default: {DEMO_DEFAULTS['output']})")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model: a transformers model (hub id or local "
                        f"dir) or {DEFAULT_MODEL} (default)")
    for flag, key, what in (("--compress-steps", "compress_steps", "stage-1 optimizer steps"),
                            ("--unsupervised-steps", "unsupervised_steps", "stage-2 optimizer steps"),
                            ("--batch-size", "batch_size", "texts per step"),
                            ("--max-length", "max_length", "tokens per training text, memory tokens included")):
        gpu, cpu = DEMO_DEFAULTS[key]
        default = f"{gpu}" if gpu == cpu else f"{gpu} on GPU, {cpu} on CPU"
        parser.add_argument(flag, type=int, default=None, help=f"{what} (default: {default})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new weights, data order and dropout "
                        "(default: 0)")
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib plot")
    parser.set_defaults(func=_run_demo)
    return parser
