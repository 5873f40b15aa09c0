"""Rows of training files: reading and validating them, splitting texts, and a resumable batch order.

Stage 1 and 2 read a text file (one document per line) or a jsonl file with a ``text`` field;
stage 3 reads jsonl rows ``{"query", "positive", "negatives": [...], "instruction"?}``. Every bad
row raises `DataError` naming the file and line; blank lines are the only rows the readers drop,
and they return how many so the trainer logs the count.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import text_lines

__all__ = ["DataError", "TextRow", "PairRow", "read_texts", "read_pairs", "split_point", "BatchOrder"]


class DataError(ValueError):
    """A training file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class TextRow:
    line: int  # 1-based line in the source file, for error messages
    text: str


@dataclass(frozen=True)
class PairRow:
    line: int
    query: str
    positive: str
    negatives: tuple[str, ...] = field(default_factory=tuple)
    instruction: str | None = None


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json")


def _load_json(path: Path, lineno: int, raw: str) -> dict:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def _string_field(path: Path, lineno: int, row: dict, key: str, required: bool = True) -> str | None:
    if key not in row:
        if required:
            raise DataError(f"{path}:{lineno}: missing field {key!r} (fields present: {sorted(row)})")
        return None
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}:{lineno}: field {key!r} must be a non-empty string, got {value!r:.60}")
    return value


def _lines(path: str | Path) -> tuple[Path, list[tuple[int, str]]]:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a data file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                        "training files must be UTF-8") from exc
    lines = list(enumerate(text_lines(text), 1))
    if not any(raw.strip() for _, raw in lines):
        raise DataError(f"{path}: the file is empty")
    return path, lines


def read_texts(path: str | Path) -> tuple[list[TextRow], int]:
    """Rows of a ``.txt`` (one document per line) or ``.jsonl`` (``{"text": ...}``) file.

    Returns:
        (rows, skipped): `skipped` counts the blank lines left out.
    """
    path, lines = _lines(path)
    rows, skipped = [], 0
    for lineno, raw in lines:
        if not raw.strip():
            skipped += 1
            continue
        if _is_jsonl(path):
            raw = _string_field(path, lineno, _load_json(path, lineno, raw), "text")
        rows.append(TextRow(lineno, raw.strip()))
    return rows, skipped


def read_pairs(path: str | Path, num_negatives: int) -> tuple[list[PairRow], int]:
    """Rows of a supervised jsonl file; each keeps its first `num_negatives` hard negatives.

    A row with fewer than `num_negatives` negatives is an error: every query of a batch must see
    the same number of hard negatives for the batch to be one tensor.
    """
    path, lines = _lines(path)
    if not _is_jsonl(path):
        raise DataError(f"{path}: supervised data must be a .jsonl file of {{query, positive, negatives}} rows")
    rows, skipped = [], 0
    for lineno, raw in lines:
        if not raw.strip():
            skipped += 1
            continue
        row = _load_json(path, lineno, raw)
        negatives = row.get("negatives", [])
        if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
            raise DataError(f"{path}:{lineno}: field 'negatives' must be a list of non-empty strings")
        if len(negatives) < num_negatives:
            raise DataError(f"{path}:{lineno}: {len(negatives)} negatives, but --num-negatives is {num_negatives}")
        rows.append(PairRow(lineno, _string_field(path, lineno, row, "query"),
                            _string_field(path, lineno, row, "positive"), tuple(negatives[:num_negatives]),
                            _string_field(path, lineno, row, "instruction", required=False)))
    return rows, skipped


def split_point(num_tokens: int, min_side: int, seed: int, epoch: int, index: int) -> int:
    """A split in ``[min_side, num_tokens - min_side]``, a pure function of (seed, epoch, index).

    Drawing from its own generator keeps splits identical after a resume and independent of how
    much of the global RNG dropout consumed.
    """
    return random.Random(f"{seed}:{epoch}:{index}").randint(min_side, num_tokens - min_side)


class BatchOrder:
    """Seeded shuffled order of example indices, batch by batch, across epochs; resumable by position.

    Each global batch holds `global_batch` examples; with several ranks, rank r takes the r-th
    contiguous slice, so the concatenation over ranks is the batch a single process would see.
    The last incomplete batch of an epoch is dropped (logged by the trainer).
    """

    def __init__(self, num_examples: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if num_examples < global_batch:
            raise DataError(f"{num_examples} examples cannot fill one batch of {global_batch}")
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_examples // global_batch

    def batch(self, position: int) -> tuple[int, list[int]]:
        """(epoch, this rank's example indices) of the batch at `position` (0-based, global)."""
        epoch, offset = divmod(position, self.batches_per_epoch)
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        per_rank = self.global_batch // self.world_size
        start = offset * self.global_batch + self.rank * per_rank
        return epoch, order[start:start + per_rank].tolist()
