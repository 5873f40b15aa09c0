"""Atomic, resumable training checkpoints.

A checkpoint is a directory ``<output>/checkpoints/step-<N>/`` holding

- ``trainable.safetensors``: the trainable parameters only (LoRA, memory embeddings);
- ``state.pt``: plain state dicts of the optimizer and scheduler, the step and the trainer's
  running state (``torch.save`` of tensors, dicts, lists and numbers only; loaded with
  ``weights_only=True``). The step is also the data position and the random state: the trainer
  derives the batch order, the split points and the dropout seed of every step from (seed, step,
  rank);
- ``meta.json``: the step, the number of processes, the config (what ``--resume`` checks) and the sha256 of
  the two other files.

It is written under a temporary name and renamed into place, so a run killed while saving
leaves the previous checkpoint intact and never a half-written one; one that fails (a full disk) removes its
temporary files and says which checkpoint it could not write. A checkpoint damaged later (a bad disk,
a truncating copy) fails its sha256: `latest_checkpoint` skips it, with a warning, for an older one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["trainable_state", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "saved_meta", "writing"]

_PREFIX = "step-"
_FILES = ("trainable.safetensors", "state.pt")  # what meta.json holds the sha256 of

log = logging.getLogger(__name__)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> detached CPU copy of every parameter that requires grad."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, step: int, config: dict, keep: int = 2, world_size: int = 1,
                    running: dict | None = None) -> Path:
    """Write the checkpoint of `step` atomically; keep only the `keep` newest ones. Returns its path.

    `running`: the trainer's state beyond the step (plain numbers), given back by `load_checkpoint`."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"{_PREFIX}{step}", root / f".tmp-{_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(f"the checkpoint {final}"):
            tmp.mkdir()
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                     "running": running or {}}
            torch.save(state, tmp / "state.pt")
            meta = {"step": step, "world_size": world_size, "config": config,
                    "sha256": {name: _sha256(tmp / name) for name in _FILES}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(_checkpoints(root), key=_step_of)[:-keep]:
        shutil.rmtree(old)
    return final


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """An OSError raised while writing `what` (a full disk, say) as one line that names it."""
    try:
        yield
    except OSError as exc:
        raise OSError(f"cannot write {what}: {exc.strerror or exc}") from exc


def _checkpoints(root: Path) -> list[Path]:
    return [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.name[len(_PREFIX):].isdigit()]


def _step_of(path: Path) -> int:
    return int(path.name[len(_PREFIX):])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damage(path: Path) -> str | None:
    """What is wrong with the checkpoint `path` (None: nothing): an unreadable meta.json, or a file missing or
    other than the one whose sha256 it holds (checkpoints from before the sha256 are not checked)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        sums = meta.get("sha256", {})
        if not isinstance(meta.get("config"), dict) or not isinstance(sums, dict):
            return "meta.json: not a checkpoint's"
    except (OSError, ValueError, AttributeError) as exc:
        return f"meta.json: {exc}"
    for name, expected in sums.items():
        try:
            if _sha256(path / name) != expected:
                return f"{name}: its sha256 differs from meta.json's"
        except OSError as exc:
            return f"{name}: {exc.strerror or exc}"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint under `output_dir`, or None; a damaged newer one is skipped with a warning."""
    for path in sorted(_checkpoints(Path(output_dir) / "checkpoints"), key=_step_of, reverse=True):
        damage = _damage(path)
        if damage is None:
            return path
        log.warning("checkpoint %s is damaged (%s): skipped for an older one", path, damage)
    return None


def saved_meta(path: str | Path) -> dict:
    """A checkpoint's ``meta.json``: ``step``, ``world_size`` and the ``config`` it was written with."""
    return json.loads((Path(path) / "meta.json").read_text())


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[int, dict]:
    """Restore parameters, optimizer and scheduler from `path`; returns the step and the running state."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise ValueError(f"{path}: trainable parameters differ from the model's (missing {missing}, extra {extra})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), state.get("running", {})
