"""Training options: one dataclass, the paper's defaults per stage, TOML files and argparse flags.

Precedence: command-line flag > ``--config`` TOML file > the stage's default. Every field has a
help text, which is what ``llm2comp train <stage> --help`` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["STAGES", "TrainConfig", "stage_defaults", "load_config", "add_config_arguments", "config_from_args"]

STAGES = ("compress", "unsupervised", "supervised")


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    stage: str = _opt("compress", "training stage", STAGES)
    model: str = _opt("smollm2-135m", "base model name or path, or the previous stage's output directory")
    data: str = _opt("", "training file: .txt (one document per line) or .jsonl (a 'text' field; "
                     "supervised: query/positive/negatives/instruction)")
    output: str = _opt("", "output directory: the trained model (LLM2Comp format), checkpoints/, log.jsonl")
    objective: str = _opt("kl", "compression objective: kl = distil the LLM reading the full text (paper's best), "
                          "nll = continuation cross-entropy, reconstruct = regenerate the prefix",
                          ("kl", "nll", "reconstruct"))
    memory_tokens: int = _opt(8, "M, memory tokens appended to each text (new models only)")
    lora_r: int = _opt(16, "LoRA rank (new models only)")
    lora_alpha: int = _opt(32, "LoRA alpha (new models only)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA path (SimCSE's noise in the unsupervised stage)")
    lr: float = _opt(1e-4, "peak learning rate of AdamW")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    schedule: str = _opt("linear", "learning-rate decay after warmup", ("linear", "cosine", "constant"))
    warmup_ratio: float = _opt(0.1, "fraction of the steps spent warming the learning rate up from 0")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    batch_size: int = _opt(32, "examples per process per micro-batch")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    epochs: int = _opt(1, "passes over the data (when --max-steps is 0)")
    max_steps: int = _opt(0, "optimizer steps to run; 0 = as many as --epochs gives")
    max_length: int = _opt(512, "maximum tokens per text (memory tokens included)")
    min_split: int = _opt(10, "compress: minimum tokens on each side of the random split")
    skip_short: bool = _opt(False, "compress: skip texts too short to split (counted in the log) instead of failing")
    temperature: float = _opt(0.05, "contrastive temperature")
    num_negatives: int = _opt(1, "supervised: hard negatives per query (the first ones of each row)")
    grad_cache: bool = _opt(False, "contrastive: cached-gradient (GradCache) backward, batches larger than memory")
    chunk_size: int = _opt(16, "contrastive: texts per chunk with --grad-cache")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    precision: str = _opt("auto", "auto = bf16 autocast on GPU, fp32 on CPU", ("auto", "bf16", "fp32"))
    seed: int = _opt(42, "seed of the data order, splits, dropout and new weights")
    log_every: int = _opt(1, "optimizer steps between log lines (log.jsonl and the progress bar)")
    save_every: int = _opt(500, "optimizer steps between checkpoints (one is always written at the end)")
    resume: bool = _opt(False, "continue from the newest checkpoint in --output")
    attention_backend: str = _opt("auto", "memory_attention backend", ("auto", "torch", "triton", "cuda", "flash"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_STAGE_DEFAULTS = {
    "compress": {"lr": 1e-4, "lora_dropout": 0.05, "batch_size": 16},
    "unsupervised": {"lr": 1e-5, "lora_dropout": 0.2, "batch_size": 64},
    "supervised": {"lr": 1e-5, "lora_dropout": 0.05, "batch_size": 32},
}


def stage_defaults(stage: str) -> dict[str, Any]:
    base = {f.name: f.default for f in fields(TrainConfig)}
    return {**base, **_STAGE_DEFAULTS[stage], "stage": stage}


def _check(cfg: TrainConfig) -> TrainConfig:
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ValueError(f"{f.name} must be one of {choices}, got {getattr(cfg, f.name)!r}")
    if not cfg.data or not cfg.output:
        raise ValueError("data and output are required (--data, --output or the config file)")
    positive = ("batch_size", "grad_accum", "epochs", "max_length", "min_split", "chunk_size", "log_every",
                "save_every", "memory_tokens", "lora_r")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.temperature <= 0 or cfg.lr <= 0 or not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.warmup_ratio < 1:
        raise ValueError("temperature and lr must be > 0, lora_dropout and warmup_ratio in [0, 1)")
    return cfg


def load_config(stage: str, toml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """The stage's defaults, updated by the TOML file's keys (dashes or underscores), then `overrides`."""
    values = stage_defaults(stage)
    if toml_path is not None:
        with open(toml_path, "rb") as fh:
            table = {k.replace("-", "_"): v for k, v in tomllib.load(fh).items()}
        unknown = set(table) - set(values)
        if unknown:
            raise ValueError(f"{toml_path}: unknown options {sorted(unknown)}; valid: {sorted(values)}")
        values.update(table)
    values.update(overrides)
    values["stage"] = stage
    return _check(TrainConfig(**values))


def add_config_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """One flag per TrainConfig field (but `stage`); unset flags stay absent from the namespace."""
    defaults = stage_defaults(stage)
    parser.add_argument("--config", help="TOML file giving any of these options (flags override it)")
    for f in fields(TrainConfig):
        if f.name == "stage":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {defaults[f.name]!r})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), **kwargs)


def config_from_args(args: argparse.Namespace, stage: str) -> TrainConfig:
    """TrainConfig from a namespace built by `add_config_arguments`."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    overrides.pop("stage", None)
    return load_config(stage, getattr(args, "config", None), **overrides)
