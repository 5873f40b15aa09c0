"""Training options: one dataclass, the paper's defaults per stage, TOML files and argparse flags.

Precedence: command-line flag > ``--config`` TOML file > the stage's default. Every field has a
help text, which is what ``llm2comp train <stage> --help`` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["DEMO_DEFAULTS", "STAGES", "ConfigError", "TrainConfig", "stage_defaults", "flag", "load_config",
           "load_recipe",
           "add_config_arguments", "config_from_args"]

STAGES = ("compress", "unsupervised", "supervised")
_CONTRASTIVE = ("unsupervised", "supervised")


# `llm2comp demo`'s (GPU, CPU) sizes. The CPU ones fit the 6 minutes of a 2-core machine, the four Lee evaluations
# included (docs/quality.md has the measured times and scores of three seeds); the GPU ones are larger and untimed.
DEMO_DEFAULTS = {
    "output": "llm2comp-demo",
    "compress_steps": (60, 6),
    "unsupervised_steps": (40, 24),
    "batch_size": (32, 8),
    "max_length": (256, 128),
}


class ConfigError(ValueError):
    """An option value, config file or --output directory that cannot be used; the message names it."""


def _opt(default: Any, help: str, choices: tuple | None = None, stages: tuple = STAGES) -> Any:
    """A field; `stages`: the stages it applies to (the help says so when not all)."""
    return field(default=default, metadata={"help": help, "choices": choices, "stages": stages})


@dataclass
class TrainConfig:
    stage: str = _opt("compress", "training stage", STAGES)
    model: str = _opt("smollm2-135m", "base model name or path, or the previous stage's output directory")
    data: str = _opt("", "training file: .txt (one document per line) or .jsonl (a 'text' field; "
                     "supervised: query/positive/negatives/instruction)")
    output: str = _opt("", "output directory: the trained model (LLM2Comp format), checkpoints/, log.jsonl")
    objective: str = _opt("kl", "compression objective: kl = distil the LLM reading the full text (paper's best), "
                          "nll = continuation cross-entropy, reconstruct = regenerate the prefix",
                          ("kl", "nll", "reconstruct"), stages=("compress",))
    memory_tokens: int = _opt(8, "M, memory tokens appended to each text (new models only)")
    lora_r: int = _opt(16, "LoRA rank (new models only)")
    lora_alpha: int = _opt(32, "LoRA alpha (new models only)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA path")
    attention_dropout: float = _opt(0.0, "attention-probability dropout in every layer while training (SimCSE's "
                                    "noise in the unsupervised stage: 0.2 as the paper)")
    memory_init: str = _opt("random", "how new memory-token rows start: random = distinct rows drawn with the "
                            "embedding's per-dimension mean and std, mean = all the mean row (new models only)",
                            ("random", "mean"))
    encoder_bos: bool = _opt(True, "start every encoder row with BOS, as the decoder and teacher of compression "
                             "training (new models only)")
    fresh_lora: bool = _opt(False, "fold the loaded model's LoRA into the weights and train a fresh LoRA, as the "
                            "paper does between stages (default on in the unsupervised and supervised stages)")
    freeze_memory: bool = _opt(False, "keep the memory-token rows fixed (default on after stage 1, as the paper)")
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
    min_split: int = _opt(10, "minimum tokens on each side of the random split", stages=("compress",))
    skip_short: bool = _opt(False, "skip texts too short to split (counted in the log) instead of failing",
                            stages=("compress",))
    temperature: float = _opt(0.05, "contrastive temperature", stages=_CONTRASTIVE)
    num_negatives: int = _opt(1, "hard negatives per query (the first ones of each row)", stages=("supervised",))
    grad_cache: bool = _opt(False, "cached-gradient (GradCache) backward, batches larger than memory",
                            stages=_CONTRASTIVE)
    chunk_size: int = _opt(16, "texts per chunk with --grad-cache", stages=_CONTRASTIVE)
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    precision: str = _opt("auto", "autocast dtype; auto = bf16 on GPUs that have it (Ampere and newer), fp16 with "
                          "loss scaling on older ones, fp32 on CPU", ("auto", "bf16", "fp16", "fp32"))
    seed: int = _opt(42, "seed of the data order, splits, dropout and new weights")
    log_every: int = _opt(1, "optimizer steps between log lines (log.jsonl and the progress bar)")
    save_every: int = _opt(500, "optimizer steps between checkpoints (one is always written at the end)")
    resume: bool = _opt(False, "continue the run in --output from its newest checkpoint (the same options but "
                        "--save-every, --log-every, --attention-backend, --gradient-checkpointing, --grad-cache, "
                        "--chunk-size; the same global batch)")
    overwrite: bool = _opt(False, "start afresh in an --output that holds a run: its checkpoints and log are deleted")
    attention_backend: str = _opt("auto", "memory_attention backend",
                                  ("auto", "torch", "sdpa", "triton", "cuda", "flash"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_STAGE_DEFAULTS = {
    "compress": {"lr": 1e-4, "lora_dropout": 0.05, "batch_size": 16},
    "unsupervised": {"lr": 3e-5, "lora_dropout": 0.05, "attention_dropout": 0.2, "batch_size": 64,
                     "fresh_lora": True, "freeze_memory": True},
    "supervised": {"lr": 1e-4, "lora_dropout": 0.05, "batch_size": 32, "fresh_lora": True, "freeze_memory": True},
}


def stage_defaults(stage: str) -> dict[str, Any]:
    base = {f.name: f.default for f in fields(TrainConfig)}
    return {**base, **_STAGE_DEFAULTS[stage], "stage": stage}


_REQUIRED = ("data", "output")
_RANGES = (  # (options, test, what the error says they must be)
    (("batch_size", "grad_accum", "epochs", "max_length", "min_split", "chunk_size", "log_every", "save_every",
      "memory_tokens", "lora_r", "lora_alpha"), lambda v: v >= 1, ">= 1"),
    (("max_steps", "num_negatives", "max_grad_norm", "weight_decay"), lambda v: v >= 0, ">= 0"),
    (("lr", "temperature"), lambda v: v > 0, "> 0"),
    (("lora_dropout", "attention_dropout", "warmup_ratio"), lambda v: 0 <= v < 1, "in [0, 1)"),
)
_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
          "bool": ((bool,), "true or false")}


def flag(name: str) -> str:
    """The command-line flag of option `name`: ``max_length`` -> ``--max-length``."""
    return "--" + name.replace("_", "-")


def _kind(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _check(cfg: TrainConfig) -> TrainConfig:
    for f in fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"{flag(f.name)} must be one of {choices}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag(f.name)} must be a finite number, got {value}")
    missing = [flag(name) for name in _REQUIRED if not getattr(cfg, name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required (a flag or a key of the --config file)")
    for names, ok, what in _RANGES:
        for name in names:
            if not ok(getattr(cfg, name)):
                raise ConfigError(f"{flag(name)} must be {what}, got {getattr(cfg, name)}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    return cfg


def _toml_file(path: str | Path) -> dict[str, Any]:
    """The parsed TOML file `path`; errors name it."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})") from exc


def _options(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """`raw` TOML keys (dashes or underscores) as TrainConfig options, each checked for its type; errors name
    `where` and the key."""
    kinds = {f.name: _kind(f) for f in fields(TrainConfig) if f.name != "stage"}
    table = {key.replace("-", "_"): (key, value) for key, value in raw.items()}
    if "stage" in table:
        raise ConfigError(f"{where}: 'stage' cannot be set in a config file; the command names it "
                          "(llm2comp train <stage>)")
    unknown = sorted(set(table) - set(kinds))
    if unknown:
        raise ConfigError(f"{where}: unknown options {unknown}; valid: {sorted(kinds)}")
    for name, (key, value) in table.items():
        types, expected = _TYPES[kinds[name]]
        if not isinstance(value, types) or isinstance(value, bool) != (kinds[name] == "bool"):
            raise ConfigError(f"{where}: {key} must be {expected}, got {value!r}")
    return {name: value for name, (_, value) in table.items()}


def _read_toml(path: str | Path) -> dict[str, Any]:
    """The options of a TOML config file (keys with dashes or underscores); errors name the file and key."""
    return _options(_toml_file(path), str(path))


def load_recipe(path: str | Path, **overrides: Any) -> list[TrainConfig]:
    """The stages of a recipe file, in order: top-level keys apply to every stage, a ``[compress]``,
    ``[unsupervised]`` or ``[supervised]`` table to its stage; ``output`` is the recipe's folder, each stage
    writes ``<output>/<stage>``, and each stage after the first starts from the one before it. `overrides` (the
    command's flags) win over the file."""
    raw = _toml_file(path)
    shared = _options({k: v for k, v in raw.items() if not isinstance(v, dict)}, str(path))
    shared.update(overrides)
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    unknown = sorted(set(tables) - set(STAGES))
    if unknown or not tables:
        raise ConfigError(f"{path}: a recipe has one table per stage ({', '.join(f'[{s}]' for s in STAGES)}), "
                          f"got {sorted(tables)}")
    if not shared.get("output"):
        raise ConfigError(f"{path}: output (the recipe's folder) is required")
    return chain_stages(shared, {stage: _options(table, f"{path} [{stage}]") for stage, table in tables.items()})


def chain_stages(shared: dict[str, Any], stages: dict[str, dict[str, Any]]) -> list[TrainConfig]:
    """The configs of `stages` (stage -> its options), run in `STAGES` order: `shared` options (with
    ``output``, the folder each stage writes ``<output>/<stage>`` into) under each stage's, and every stage after
    the first starting from the one before it."""
    configs: list[TrainConfig] = []
    for stage in (s for s in STAGES if s in stages):
        options = {**shared, **stages[stage], "output": str(Path(shared["output"]) / stage)}
        if configs:
            options["model"] = configs[-1].output
        configs.append(load_config(stage, **options))
    return configs


def load_config(stage: str, toml_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """The stage's defaults, updated by the TOML file's keys (dashes or underscores), then `overrides`."""
    values = stage_defaults(stage)
    given = {**(_read_toml(toml_path) if toml_path is not None else {}), **overrides}
    applies = {f.name: f.metadata["stages"] for f in fields(TrainConfig) if f.name != "stage"}
    for name in given:
        if name in applies and stage not in applies[name]:
            raise ConfigError(f"{flag(name)} applies to the {' and '.join(applies[name])} stage only, "
                              f"not to {stage}" + (f" (set in {toml_path})" if name not in overrides else ""))
    values.update(given)
    values["stage"] = stage
    return _check(TrainConfig(**values))


def add_config_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    """One flag per TrainConfig field (`--help` lists those that apply to `stage`); unset flags stay absent from
    the namespace."""
    defaults = stage_defaults(stage)
    parser.add_argument("--config", help="TOML file giving any of these options (flags override it)")
    for f in fields(TrainConfig):
        if f.name == "stage":
            continue
        applies = f.metadata["stages"]
        only = "" if applies == STAGES else f"[{' and '.join(applies)} only] "
        default = "required: here or in --config" if f.name in _REQUIRED else f"default: {defaults[f.name]!r}"
        # another stage's option: parsed but not listed, for load_config to refuse it by name
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{only}{f.metadata['help']} ({default})" if stage in applies
                                  else argparse.SUPPRESS}
        if _kind(f) == "bool":
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kind = {"int": int, "float": float, "str": str}[_kind(f)]
            parser.add_argument(flag(f.name), type=kind, choices=f.metadata["choices"], **kwargs)


def config_from_args(args: argparse.Namespace, stage: str) -> TrainConfig:
    """TrainConfig from a namespace built by `add_config_arguments`."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    overrides.pop("stage", None)
    return load_config(stage, getattr(args, "config", None), **overrides)
