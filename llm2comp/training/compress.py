"""Stage 1: compression pretraining.

Each text is split at a random token into a prefix and a continuation. The encoder (LoRA,
bidirectional, memory tokens) reads the prefix; the decoder is the same network with its
adapters disabled and causal attention, i.e. the frozen original LLM, and reads
``[BOS embedding, M memory hidden states, target embeddings]`` as inputs_embeds (right padded,
positions 0, 1, ...). Position ``M + j`` of that sequence predicts target token j. Objectives:

- ``kl``: KL(teacher || student) of the next-token distributions on the continuation, where the
  teacher is the frozen LLM reading ``[BOS, prefix, continuation]`` (no grad) at the positions
  that predict the same continuation tokens; through the LM head by `linear_kl_loss`.
- ``nll``: cross-entropy of the continuation tokens.
- ``reconstruct``: cross-entropy of the prefix tokens (the decoder regenerates the prefix).

The step is batched: padding-aware index and mask tensors, no per-sample loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llm2comp_kernels import linear_kl_loss

from ..tokenization import TokenBatch, text_token_ids
from . import modeling
from .rows import DataError, TextRow, split_point

__all__ = ["CompressionBatch", "make_compression_batch", "usable_rows", "compression_loss"]

# nll / reconstruct: rows of `[C, V]` logits alive at once (1024 x 128k fp32 = 512 MiB).
CE_CHUNK_ROWS = 1024


@dataclass
class CompressionBatch:
    encoder_inputs: TokenBatch  # model.tokenize_ids() of the prefixes (memory tokens appended)
    targets: torch.Tensor  # int64 [B, K] tokens the decoder predicts (continuation, or prefix), right padded
    target_mask: torch.Tensor  # bool [B, K]
    teacher_ids: torch.Tensor  # int64 [B, 1 + T]: BOS + full text, right padded (kl only)
    teacher_mask: torch.Tensor  # int64 [B, 1 + T] attention mask
    teacher_start: torch.Tensor  # int64 [B]: teacher position predicting targets[:, 0] (= split)

    def to(self, device: torch.device) -> CompressionBatch:
        return CompressionBatch(self.encoder_inputs.to(device), *(getattr(self, f).to(device) for f in
                                                                  ("targets", "target_mask", "teacher_ids",
                                                                   "teacher_mask", "teacher_start")))

    @property
    def num_tokens(self) -> int:
        return int(self.target_mask.sum())


def usable_rows(tokenizer, rows: list[TextRow], path: str, min_split: int, max_tokens: int,
                skip_short: bool) -> tuple[list[TextRow], int]:
    """The rows long enough to split (>= 2 * min_split tokens), and how many were dropped.

    Raises DataError naming the first short row unless `skip_short`.
    """
    ids = text_token_ids(tokenizer, [r.text for r in rows], max_tokens)
    keep = [r for r, i in zip(rows, ids) if len(i) >= 2 * min_split]
    if len(keep) < len(rows) and not skip_short:
        bad, n = next((r, len(i)) for r, i in zip(rows, ids) if len(i) < 2 * min_split)
        raise DataError(f"{path}:{bad.line}: text too short to split ({n} "
                        f"tokens, needs {2 * min_split}: --min-split {min_split} on each side); "
                        f"{len(rows) - len(keep)} such rows (--skip-short drops them)")
    return keep, len(rows) - len(keep)


def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids[mask] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return ids, mask


def make_compression_batch(model, texts: list[str], *, objective: str, min_split: int, max_length: int,
                           seed: int, epoch: int, indices: list[int]) -> CompressionBatch:
    """Split each text (split points from (seed, epoch, index), so a resumed run draws the same).

    A text is cut to ``max_length - M - 1`` tokens, so the encoder input (BOS, prefix, M memory
    tokens), the decoder input ``1 + M + targets`` and the teacher input ``1 + text`` all fit in
    `max_length`.
    """
    tokenizer, m = model.tokenizer, model.num_memory_tokens
    ids = text_token_ids(tokenizer, texts, max_length - m - 1)
    splits = [split_point(len(i), min_split, seed, epoch, idx) for i, idx in zip(ids, indices)]
    # From the ids, not the prefix text tokenized again: a split between the byte tokens of one character
    # would lose its first bytes there (and some tokenizers would add a token at the cut).
    encoder_inputs = model.tokenize_ids([i[:s] for i, s in zip(ids, splits)], max_length=max_length)
    pad = model.pad_token_id
    bos = model.start_token_id
    if objective == "reconstruct":
        targets, target_mask = _pad([i[:s] for i, s in zip(ids, splits)], pad)
    else:
        targets, target_mask = _pad([i[s:] for i, s in zip(ids, splits)], pad)
    teacher_ids, teacher_mask = _pad([[bos, *i] for i in ids], pad)
    return CompressionBatch(encoder_inputs, targets, target_mask, teacher_ids, teacher_mask.long(),
                            torch.tensor(splits))


def _cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden [n, H] @ weight.T [H, V]`` against `targets` [n], at least in fp32.

    Rows go through in chunks of `CE_CHUNK_ROWS`, each checkpointed: one chunk's `[C, V]` logits exist at a
    time, in forward and in backward (recomputed), never the `[n, V]` of the whole batch.
    """
    parts = [checkpoint(_cross_entropy_sum, h, weight, t, use_reentrant=False)
             for h, t in zip(hidden.split(CE_CHUNK_ROWS), targets.split(CE_CHUNK_ROWS))]
    return torch.stack(parts).sum() / targets.numel()


def compression_loss(model, batch: CompressionBatch, objective: str) -> torch.Tensor:
    """Scalar loss of one batch (mean over target tokens); gradients reach only the trainable params."""
    memory = modeling.memory_states(model, batch.encoder_inputs)  # [B, M, H]
    b, m, _ = memory.shape
    k = batch.targets.shape[1]
    with modeling.frozen_decoder(model):
        weight = model.lm_head.weight.detach()  # frozen base head (memory rows at their initial values)
        embed = model.model.get_input_embeddings()
        bos = torch.full((b, 1), model.start_token_id, device=memory.device)
        targets = embed(batch.targets)
        inputs = torch.cat([embed(bos), memory.to(targets.dtype), targets], dim=1)
        attention = torch.cat([torch.ones(b, 1 + m, dtype=torch.long, device=memory.device),
                               batch.target_mask.long()], dim=1)
        hidden = model.hidden_states(inputs_embeds=inputs, attention_mask=attention)
        student = hidden[:, m:m + k]  # [B, K, H]: position M + j predicts target j
        mask = batch.target_mask.reshape(-1)
        if objective != "kl":
            return _chunked_cross_entropy(student.reshape(b * k, -1)[mask], weight, batch.targets.reshape(-1)[mask])
        with torch.no_grad():
            full = model.hidden_states(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask)
            positions = (batch.teacher_start[:, None] + torch.arange(k, device=full.device)).clamp_max(
                full.shape[1] - 1)
            teacher = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))  # [B, K, H]
    h = student.shape[-1]
    return linear_kl_loss(student.reshape(-1, h), teacher.reshape(-1, h).to(student.dtype), weight.to(student.dtype),
                          mask=mask)  # fp32 (the loss is not rounded to bf16 under autocast), as the other objectives
