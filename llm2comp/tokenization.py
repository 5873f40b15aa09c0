"""Rows an LLM2Comp reads: ``[BOS] instruction text <mem_0..M-1> <pad>...``, right padded.

Texts become token ids (`text_token_ids`, or `split_instruction` with an instruction before them), then a
`TokenBatch` (`pack`): the ids plus where each row's text and memory tokens start. `LLM2Comp.tokenize` runs
both with the model's tokenizer, BOS and memory tokens; training reads the same ids and batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["TokenBatch", "bos_ids", "pack", "pad_token_id", "split_instruction", "split_instructions",
           "start_token_id", "text_token_ids"]


def start_token_id(tokenizer) -> int:
    """The token a decoder row starts from: BOS, or EOS for tokenizers without one (Qwen)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token_id(tokenizer) -> int:
    """The id padded positions hold (they are masked out): the tokenizer's pad token (its EOS where it has
    none), else 0."""
    return 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def bos_ids(tokenizer, prepend_bos: bool | None) -> list[int]:
    """The ids every row starts with: `start_token_id` if `prepend_bos`, none if False, and for None (models
    saved before the option) the BOS the tokenizer adds itself, if it does."""
    if prepend_bos is None:
        bos = tokenizer.bos_token_id
        return [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []
    return [start_token_id(tokenizer)] if prepend_bos else []


def text_token_ids(tokenizer, texts: list[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each text alone (no special tokens added; special-token names inside texts read as plain
    text), cut to `max_tokens` if given."""
    cut = {"truncation": True, "max_length": max_tokens} if max_tokens is not None else {}
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, **cut)["input_ids"]


def split_instruction(tokenizer, texts: list[str], instruction: str | None) -> list[tuple[list[int], list[int]]]:
    """(instruction ids, text ids) per text, from one tokenization of ``instruction + text`` (fast
    tokenizers): a separate one would end "Query: " in a lone space token and start the text without its
    leading space, which is not what the model reads in running text. A token that holds any character of
    the text belongs to the text. Special-token names inside texts are read as plain text."""
    if not instruction or not tokenizer.is_fast:
        head = tokenizer(instruction, add_special_tokens=False)["input_ids"] if instruction else []
        return [(head, ids) for ids in text_token_ids(tokenizer, texts)]
    joined = tokenizer([instruction + t for t in texts], add_special_tokens=False, split_special_tokens=True,
                       return_offsets_mapping=True)
    rows = []
    for ids, offsets in zip(joined["input_ids"], joined["offset_mapping"]):
        n = sum(end <= len(instruction) for _, end in offsets)
        rows.append((ids[:n], ids[n:]))
    return rows


def split_instructions(tokenizer, texts: list[str],
                       instructions: Sequence[str | None]) -> list[tuple[list[int], list[int]]]:
    """`split_instruction` with an instruction per text, in the texts' order (one tokenizer call per distinct
    instruction)."""
    groups: dict[str | None, list[int]] = {}
    for i, instruction in enumerate(instructions):
        groups.setdefault(instruction, []).append(i)
    rows: list = [None] * len(texts)
    for instruction, members in groups.items():
        for i, row in zip(members, split_instruction(tokenizer, [texts[i] for i in members], instruction)):
            rows[i] = row
    return rows


@dataclass(eq=False)
class TokenBatch:
    """Right-padded rows ``[BOS] instruction text <mem_0..M-1> <pad>...``, all int64.

    A mapping of its field names too, so ``model(**batch)`` and ``batch["input_ids"]`` work.
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 on the seq_lens real tokens
    seq_lens: torch.Tensor  # [B] real tokens per row
    memory_start: torch.Tensor  # [B] first memory token (the M memory tokens end the row)
    text_start: torch.Tensor  # [B] first text token, after the BOS and instruction

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(**{k: v.to(device) for k, v in self.items()})

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((k, getattr(self, k)) for k in self.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)


def pack(rows: list[tuple[list[int], list[int]]], *, bos: list[int], memory_token_ids: list[int],
         pad_token_id: int, max_length: int) -> TokenBatch:
    """The batch of (instruction ids, text ids) rows, each text cut so its row fits `max_length`."""
    ids_rows, text_start = [], []
    for head, ids in rows:
        prefix = bos + head
        budget = max_length - len(prefix) - len(memory_token_ids)
        if budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for text after {len(prefix)} prefix and "
                             f"{len(memory_token_ids)} memory tokens")
        ids_rows.append(prefix + ids[:budget] + memory_token_ids)
        text_start.append(len(prefix))
    width = max(len(r) for r in ids_rows)
    input_ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in ids_rows], dtype=torch.long)
    seq_lens = torch.tensor([len(r) for r in ids_rows], dtype=torch.long)
    attention_mask = (torch.arange(width)[None, :] < seq_lens[:, None]).long()
    return TokenBatch(input_ids, attention_mask, seq_lens, seq_lens - len(memory_token_ids),
                      torch.tensor(text_start, dtype=torch.long))
