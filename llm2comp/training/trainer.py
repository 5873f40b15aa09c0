"""The training loop shared by the three stages.

AdamW over the trainable parameters (LoRA, memory embeddings) with linear warmup then linear,
cosine or constant decay; gradient accumulation; bf16 autocast on GPU (fp16 with dynamic loss scaling on
GPUs without bf16); gradients averaged over
``torchrun`` ranks once per step; a tqdm bar and ``<output>/log.jsonl`` with the loss (mean over
the ``log_every`` window), lr and tokens/s; atomic checkpoints every ``save_every`` steps and at
the end; ``resume`` continues from the newest checkpoint with the same data order, splits, dropout
and therefore losses (unless the batch is cut otherwise, see `_RESUME_FREE`). An ``output`` holding a
run is refused unless resumed or overwritten, one holding anything else always, and one another run is
writing into (it holds the directory's lock) too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model import CONFIG_NAME
from ..outputs import exclusive, require_empty
from ..precision import has_bf16
from . import modeling
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, saved_meta, writing
from .config import ConfigError, TrainConfig, flag
from .distributed import (
    all_mean,
    average_gradients,
    broadcast_parameters,
    digest64,
    is_main,
    rank_and_world,
    ranks_agree,
    setup_distributed,
)
from .optim import make_optimizer
from .rows import BatchOrder, DataError
from .stages import build_stage, read_rows

__all__ = ["resolve_precision", "autocast_for", "train"]

log = logging.getLogger(__name__)

_RUN_FILES = ("checkpoints", "log.jsonl", CONFIG_NAME)  # what a run leaves in its output directory
# fp16: consecutive overflowed steps that end the run, the loss scale having halved as often (2^25 times smaller):
# no gradient is that large, so the forward itself overflows.
MAX_OVERFLOWED_STEPS = 25
# The options a resumed run may change: where and how often it writes, and how it computes the same steps. Any
# other change (model, data, schedule, lengths, precision...) would not continue the run that was killed. How a
# batch is cut into forwards (grad cache chunks, processes) picks each example's LoRA dropout mask, though: with
# dropout on, a recut batch goes on with other masks (same distribution), not bit for bit (a warning says so).
_RESUME_FREE = {"output", "resume", "overwrite", "save_every", "log_every", "attention_backend",
                "gradient_checkpointing", "grad_cache", "chunk_size"}


def _log_line(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """"bf16", "fp16" or "fp32": `cfg.precision` on `device` ("auto": bf16 on GPUs with bf16 tensor cores,
    fp16 on older GPUs, fp32 on CPU)."""
    if cfg.precision == "auto":
        return "fp32" if device.type != "cuda" else "bf16" if has_bf16(device) else "fp16"
    if cfg.precision == "bf16" and not has_bf16(device):
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 tensor cores "
                          "(compute capability below 8.0); use --precision fp16 (or auto)")
    return cfg.precision


def autocast_for(precision: str, device: torch.device) -> torch.autocast:
    """Autocast for a `resolve_precision` result: bf16 or fp16, or disabled for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def optimizer_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, scheduler,
                   scaler: torch.amp.GradScaler, max_grad_norm: float) -> bool:
    """Unscale the gradients (fp16), clip them to `max_grad_norm` (0: no clipping), step and clear them.

    Returns False when fp16 gradients overflowed: the update and the schedule's step are skipped and the loss
    scale halves (the scaler's usual recovery)."""
    scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    stepped = scaler.get_scale() >= scale
    if stepped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped


@contextlib.contextmanager
def _output_locked(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Rank 0 holds the output directory's lock (`exclusive`) for the run; every rank raises if it cannot, so
    none waits for the others."""
    out, error = Path(cfg.output), None
    with contextlib.ExitStack() as stack:
        if is_main():
            try:
                if out.exists() and not out.is_dir():
                    raise ConfigError(f"--output {out} is a file, not a directory")
                stack.enter_context(exclusive(out))
            except (ConfigError, OSError) as exc:
                error = exc
        agree = ranks_agree(int(error is None), device)
        if error is not None:
            raise error
        if not agree:
            raise ConfigError(f"--output {out}: rank 0 could not take the directory for this run (its error says why)")
        yield


def _check_output(cfg: TrainConfig, world: int) -> Path | None:
    """Refuse an output that holds a run unless resumed or overwritten, and one that holds anything else; with
    ``resume``, check the newest checkpoint's options and global batch against `cfg` and `world` processes,
    and return it (None: start afresh)."""
    out = Path(cfg.output)
    found = [name for name in _RUN_FILES if (out / name).exists()]
    if not found:
        require_empty(out, "--output ")  # not a run's: the user's own files
    elif not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"--output {out} holds a run ({', '.join(found)}): --resume continues it, "
                          "--overwrite starts afresh")
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        meta = saved_meta(ckpt)
        saved, where = meta["config"], f"in the run being resumed ({ckpt / 'meta.json'})"
        for f in dataclasses.fields(cfg):
            key = f.name  # an option the run predates is not checked
            if (key not in _RESUME_FREE and key != "batch_size" and key in saved and saved[key] != getattr(cfg, key)
                    and not (key in ("data", "model") and _same_file(saved[key], getattr(cfg, key)))):
                raise ConfigError(f"--resume: {'the stage' if key == 'stage' else flag(key)} is "
                                  f"{getattr(cfg, key)!r} here but {saved[key]!r} {where}")
        # the data order is that of the global batch: any split of it over processes continues the run (a
        # checkpoint without world_size predates that record: then the batch per process must match)
        saved_world = meta.get("world_size")
        here, there = cfg.batch_size * (world if saved_world else 1), saved.get("batch_size", 0) * (saved_world or 1)
        if here != there:
            raise ConfigError(f"--resume: the global batch (--batch-size x processes) is {cfg.batch_size} x {world} "
                              f"here but {saved.get('batch_size')} x {saved_world or '?'} {where}")
        cut = {"--grad-cache/--chunk-size": (_chunking(cfg.to_dict()), _chunking(saved)),
               "the number of processes": (world, saved_world or world)}
        recut = [name for name, (now, then) in cut.items() if now != then]
        if recut and cfg.lora_dropout > 0:
            log.warning("--resume: %s changed since %s: LoRA dropout (%g) now draws other masks than the killed run "
                        "would have, so the losses continue the same training but not bit for bit", " and ".join(recut),
                        ckpt.name, cfg.lora_dropout)
    return ckpt


def _same_file(a: str, b: str) -> bool:
    """Whether two spellings of a path (``data.txt``, ``./data.txt``, an absolute one) name one existing file or
    directory."""
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False


def _chunking(options: dict) -> int | None:
    """The grad-cache chunk size of a run's options (None: whole batches)."""
    return options.get("chunk_size") if options.get("grad_cache") else None


def _fingerprint(cfg: TrainConfig, data: tuple[list, int] | None, ckpt: Path | None) -> int:
    """A 64-bit digest of the options (paths aside: nodes may mount the data elsewhere), the rows read (None:
    reading failed) and the checkpoint resumed from, equal on every rank of one run."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in ("data", "output")}
    rows = data[0] if data is not None else ["<unreadable>"]
    return digest64([json.dumps(options, sort_keys=True, default=str).encode(), str(ckpt and ckpt.name).encode(),
                     *(repr(r).encode() for r in rows)])


def _read_rows_on_every_rank(cfg: TrainConfig, world: int, device: torch.device, ckpt: Path | None
                             ) -> tuple[list, int]:
    """`read_rows(cfg)`, checked to be the same on every rank (with the options and the checkpoint `ckpt` to
    resume from) before anything else talks to the other ranks; every rank raises if one fails or differs, none
    waits for the others forever."""
    try:
        data, error = read_rows(cfg), None
    except DataError as exc:
        data, error = None, exc
    agree = world == 1 or ranks_agree(_fingerprint(cfg, data, ckpt), device)
    if error is not None:
        raise error
    if not agree:
        raise ConfigError("the processes of this run differ in their options, in the rows of --data (every rank "
                          "must read the same rows) or in the checkpoint they resume from (--output must be one "
                          "directory every rank sees)")
    return data


@dataclasses.dataclass
class _LogWindow:
    """The steps since the last log line, which the next line averages.

    ``loss`` sums this rank's micro-batch losses times their weights and ``tokens`` the tokens it read; ``weight``
    sums each step's weight as a mean over ranks; ``skipped`` counts the fp16 steps whose gradients overflowed;
    ``start`` is when the window began (`time.perf_counter`).
    """

    loss: float = 0.0
    weight: float = 0.0
    tokens: float = 0
    skipped: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss: float, weight: float, tokens: int) -> None:
        """One micro-batch of this rank (its step's weight is added as a mean over ranks, to ``weight``)."""
        self.loss, self.tokens = self.loss + loss * weight, self.tokens + tokens

    def record(self, step: int, lr: float, scaler: torch.amp.GradScaler, device: torch.device, world: int) -> dict:
        """The log line after `step`: mean loss, lr and tokens/s over every rank (every rank takes part), and with
        fp16 the loss scale and the skipped steps."""
        elapsed = time.perf_counter() - self.start
        record = {"step": step, "loss": all_mean(self.loss, device) / self.weight, "lr": lr,
                  "tokens_per_s": all_mean(self.tokens, device) * world / max(elapsed, 1e-9)}
        if scaler.is_enabled():
            record.update(loss_scale=scaler.get_scale(), skipped_steps=self.skipped)
        return record

    def saved(self, device: torch.device) -> list[float]:
        """``[loss, weight, tokens, seconds so far]`` as means over ranks, what any rank restores (every rank takes
        part)."""
        return [all_mean(self.loss, device), self.weight, all_mean(self.tokens, device),
                time.perf_counter() - self.start]


def _running_state(window: _LogWindow, num_examples: int, scaler: torch.amp.GradScaler,
                   device: torch.device) -> dict:
    """What a checkpoint saves besides the weights, optimizer and schedule, for `_Resumed` (every rank takes
    part)."""
    return {"log_window": window.saved(device), "examples": num_examples, "grad_scaler": scaler.state_dict(),
            "skipped_steps": window.skipped}


@dataclasses.dataclass
class _Resumed:
    """Where a run starts: step 0, or the checkpoint it resumes from.

    ``running`` is what that checkpoint saved besides the weights, optimizer and schedule (`_running_state`), and
    ``world_size`` the number of processes of the run that saved it.
    """

    checkpoint: Path | None
    step: int
    running: dict
    world_size: int

    @classmethod
    def load(cls, ckpt: Path | None, model, optimizer, scheduler, world: int) -> _Resumed:
        """Restore checkpoint `ckpt` into the model, optimizer and schedule (None: a fresh run of `world`
        processes)."""
        if ckpt is None:
            return cls(None, 0, {}, world)
        step, running = load_checkpoint(ckpt, model, optimizer, scheduler)
        return cls(ckpt, step, running, saved_meta(ckpt).get("world_size", world))

    def restore_scaler(self, scaler: torch.amp.GradScaler) -> None:
        """The fp16 loss scale where the resumed run left it."""
        if self.running.get("grad_scaler"):
            scaler.load_state_dict(self.running["grad_scaler"])

    def check_examples(self, data: str, num_examples: int) -> None:
        """Refuse data that gives another number of examples than the run being resumed read."""
        if self.running.get("examples", num_examples) != num_examples:
            raise DataError(f"--resume: {data} gives {num_examples} examples here but {self.running['examples']} "
                            f"in the run being resumed ({self.checkpoint}): the file, or how this version reads it, "
                            "changed")

    def log_window(self, world: int) -> _LogWindow:
        """The log window so far: a window that spans the checkpoint logs what the uninterrupted run would have.
        It was saved as means over the ranks of the run that saved it, and is rescaled to `world` ranks."""
        loss, weight, tokens, elapsed = self.running.get("log_window", (0.0, 0.0, 0, 0.0))
        loss, weight, tokens = (x * self.world_size / world for x in (loss, weight, tokens))
        return _LogWindow(loss, weight, tokens, self.running.get("skipped_steps", 0), time.perf_counter() - elapsed)


def _begin_output(cfg: TrainConfig, stage, order: BatchOrder, total: int, start: int, world: int) -> None:
    """Rank 0: clear an overwritten run, create the output directory and log the run's start (what the data
    gives, what is dropped), warning of skipped rows."""
    out = Path(cfg.output)
    if cfg.overwrite:  # only now: bad data or options leave the old run as it was
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "log.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dropped = order.num_examples - order.batches_per_epoch * order.global_batch
    # micro-batches of the last epoch too few to fill an optimizer step (steps run across epochs)
    unused = 0 if cfg.max_steps else cfg.epochs * order.batches_per_epoch - total * cfg.grad_accum
    _log_line(out / "log.jsonl", {"event": "start", "stage": cfg.stage, "resumed_from": start, "total_steps": total,
                                  "examples": stage.num_examples, "skipped_rows": stage.skipped,
                                  "dropped_per_epoch_incomplete_batch": dropped,
                                  "dropped_at_end_incomplete_step": unused * order.global_batch, "world_size": world})
    for reason, n in stage.skipped.items():
        if n:
            log.warning("%s: %d rows skipped (%s)", cfg.data, n, reason)


def train(cfg: TrainConfig, model=None, progress: bool = True) -> list[dict]:
    """Run one stage as `cfg` says; returns the logged records (every rank computes them). The output directory
    is locked for the run: another run into it fails at once.

    Args:
        cfg: the options (see `TrainConfig`).
        model: an LLM2Comp model to train in place; default: loaded from ``cfg.model``.
        progress: show the tqdm bar (rank 0 only).
    """
    device = setup_distributed()
    with _output_locked(cfg, device):
        return _train(cfg, model, progress, device)


def _train(cfg: TrainConfig, model, progress: bool, device: torch.device) -> list[dict]:
    rank, world = rank_and_world()
    precision = resolve_precision(cfg, device)
    ckpt = _check_output(cfg, world)  # before the (slow) model load, as the data file's checks
    data = _read_rows_on_every_rank(cfg, world, device, ckpt)
    torch.manual_seed(cfg.seed)
    if model is None:  # fp32 computes in fp32 whatever the checkpoint holds (often bf16 or fp16 weights)
        model = modeling.load_model(cfg, torch.float32 if precision == "fp32" else None)
    modeling.prepare_for_stage(model, cfg)
    model.to(device).train()
    if cfg.gradient_checkpointing:
        modeling.enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    broadcast_parameters(params)

    stage = build_stage(cfg, model, device, data)
    try:
        order = BatchOrder(stage.num_examples, cfg.batch_size * world, cfg.seed, rank, world)
    except DataError as exc:
        raise DataError(f"{cfg.data}: {exc} (--batch-size {cfg.batch_size} x {world} processes)") from None
    total = cfg.max_steps or cfg.epochs * order.batches_per_epoch // cfg.grad_accum
    if total < 1:
        raise DataError(f"{cfg.data}: {stage.num_examples} examples give no optimizer step "
                         f"(batch {cfg.batch_size} x {world} ranks x {cfg.grad_accum} accumulation)")
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.warmup_ratio, total)
    resumed = _Resumed.load(ckpt, model, optimizer, scheduler, world)
    # fp16: the stage back-propagates weight x loss, so the usual initial scale of a loss, 2^16, is divided by
    # the largest weight (compress: target tokens; else 1); the scale then adapts as usual
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** (16 - math.ceil(math.log2(stage.max_weight))),
                                  enabled=precision == "fp16")
    resumed.restore_scaler(scaler)
    resumed.check_examples(cfg.data, stage.num_examples)
    main = is_main()
    out = Path(cfg.output)
    log_path = out / "log.jsonl"
    if main:
        _begin_output(cfg, stage, order, total, resumed.step, world)

    autocast = autocast_for(precision, device)
    records: list[dict] = []
    window = resumed.log_window(world)
    overflowed = 0  # consecutive fp16 steps whose gradients overflowed (each halves the loss scale)
    # closed however the loop ends: an error prints on a line of its own
    with tqdm(total=total, initial=resumed.step, disable=not (progress and main), desc=f"train {cfg.stage}") as bar:
        for step in range(resumed.step, total):
            # dropout masks from (seed, step, rank): a resumed run draws what the uninterrupted one did,
            # and ranks draw different masks
            torch.manual_seed(cfg.seed + 1_000_003 * (step + 1) + rank)
            weight = 0.0  # of this rank's micro-batches
            for micro in range(cfg.grad_accum):
                epoch, indices = order.batch(step * cfg.grad_accum + micro)
                with autocast:
                    loss, tokens, w = stage.micro_step(indices, epoch, scaler.scale)
                window.add(loss, w, tokens)
                weight += w
            # divided by the mean weight over ranks, then averaged over ranks: the gradient of the weighted
            # mean loss over every rank's micro-batches
            mean_weight = all_mean(weight, device)
            for p in params:
                if p.grad is not None:
                    p.grad /= mean_weight
            average_gradients(params)
            window.weight += mean_weight
            lr = scheduler.get_last_lr()[0]
            if optimizer_step(params, optimizer, scheduler, scaler, cfg.max_grad_norm):
                overflowed = 0
            else:
                window.skipped, overflowed = window.skipped + 1, overflowed + 1
                if overflowed == MAX_OVERFLOWED_STEPS:
                    raise RuntimeError(f"fp16: the last {overflowed} steps overflowed (the loss scale is down to "
                                       f"{scaler.get_scale():g}; last loss {loss:.4g}): the forward itself overflows "
                                       "float16 on this model; train with --precision fp32")
            done = step + 1
            if done % cfg.log_every == 0 or done == total:
                record = window.record(done, lr, scaler, device, world)
                records.append(record)
                if main:
                    _log_line(log_path, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window = _LogWindow()
            bar.update(1)
            if done % cfg.save_every == 0 or done == total:
                running = _running_state(window, stage.num_examples, scaler, device)
                if main:
                    save_checkpoint(out, model, optimizer, scheduler, done, cfg.to_dict(), world_size=world,
                                    running=running)
    if main:
        with writing(f"the model to {out}"):
            model.save_pretrained(out)
        _log_line(log_path, {"event": "end", "step": total})
    return records
