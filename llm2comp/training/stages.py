"""The three stages as data + one micro-step each; the trainer owns the loop around them.

A stage takes its file's rows (`read_rows`, read before the model loads) and validates what needs
the model at construction, and `micro_step(indices, epoch, scale)` runs
forward and backward on the examples `indices` (this rank's share of one micro-batch),
accumulating the gradients of ``scale(weight * loss)`` (`scale`: fp16's loss scaling, or none); it returns
the loss, the tokens processed and the weight. The trainer divides the step's gradients by the total weight
over micro-batches and ranks: the step's loss is the weighted mean of theirs (compress: weighted by target
tokens).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from ..tokenization import split_instruction
from . import modeling
from .compress import compression_loss, make_compression_batch, usable_rows
from .config import ConfigError, TrainConfig
from .contrastive import embed_and_backward, in_batch_loss, text_keys, unscaled
from .rows import DataError, read_pairs, read_texts

__all__ = ["Stage", "CompressStage", "UnsupervisedStage", "SupervisedStage", "read_rows", "build_stage"]

Scale = Callable[[torch.Tensor], torch.Tensor]  # what backward differentiates instead of the loss


class Stage(abc.ABC):
    rows: list  # the examples read (TextRow or PairRow), indexed by the batch order
    num_examples: int
    skipped: dict[str, int]  # reason -> rows dropped, logged by the trainer
    max_weight: float = 1.0  # the largest weight a micro-step can return

    def __init__(self, cfg: TrainConfig, model, device: torch.device, data: tuple[list, int]):
        """`data`: `read_rows(cfg)`, the file's rows and blank lines."""
        self.cfg, self.model, self.device = cfg, model, device
        need, what = self._min_text_tokens()
        m = model.num_memory_tokens
        if cfg.max_length < 1 + m + need:
            raise ConfigError(f"--max-length {cfg.max_length} is too small: a row holds the BOS, {m} memory tokens "
                              f"(--memory-tokens, or the loaded model's) and {what}, so it needs >= {1 + m + need}")
        if cfg.max_length > model.max_positions:
            raise ConfigError(f"--max-length {cfg.max_length} exceeds the model's {model.max_positions} positions "
                              "(max_position_embeddings)")

    def _min_text_tokens(self) -> tuple[int, str]:
        """The text tokens a row needs besides the BOS and memory tokens, and why (for the error)."""
        return 1, "at least 1 text token"

    @abc.abstractmethod
    def micro_step(self, indices: list[int], epoch: int, scale: Scale = unscaled) -> tuple[float, int, float]:
        """Forward and backward of ``scale(weight * loss)`` on examples `indices`; (loss, tokens read, weight)."""


class CompressStage(Stage):
    def __init__(self, cfg: TrainConfig, model, device: torch.device, data: tuple[list, int]):
        super().__init__(cfg, model, device, data)
        rows, blank = data
        max_tokens = cfg.max_length - model.num_memory_tokens - 1
        self.rows, short = usable_rows(model.tokenizer, rows, cfg.data, cfg.min_split, max_tokens,
                                       cfg.skip_short)
        self.num_examples, self.skipped = len(self.rows), {"blank lines": blank, "too short to split": short}
        self.max_weight = cfg.batch_size * cfg.max_length  # target tokens

    def _min_text_tokens(self):
        need = 2 * self.cfg.min_split
        return need, f"{need} text tokens to split (2 x --min-split {self.cfg.min_split})"

    def micro_step(self, indices, epoch, scale=unscaled):
        batch = make_compression_batch(self.model, [self.rows[i].text for i in indices], objective=self.cfg.objective,
                                       min_split=self.cfg.min_split, max_length=self.cfg.max_length,
                                       seed=self.cfg.seed, epoch=epoch, indices=indices).to(self.device)
        loss = compression_loss(self.model, batch, self.cfg.objective)  # mean over the batch's target tokens
        # weighted by its target tokens: the step's loss is the mean over every micro-batch's and rank's
        # tokens, as one process on the whole batch
        scale(loss * batch.num_tokens).backward()
        return loss.item(), batch.num_tokens + int(batch.encoder_inputs.attention_mask.sum()), batch.num_tokens


class _ContrastiveStage(Stage):
    def _embed_all(self, groups: list[tuple[list[str], list[str | None]]], num_queries: int, scale: Scale,
                   doc_keys: torch.Tensor | None = None) -> tuple[float, int, float]:
        """Embed the texts of `groups` (texts, per-text instructions) in chunks, in order; the first
        `num_queries` embeddings are the queries, the rest the docs (`doc_keys`: see `in_batch_loss`).
        Every micro-batch weighs 1."""
        size = self.cfg.chunk_size if self.cfg.grad_cache else None
        chunks = [(texts[i:i + (size or len(texts))], instr[i:i + (size or len(texts))])
                  for texts, instr in groups for i in range(0, len(texts), size or len(texts))]
        tokens = []

        def embed(chunk):
            emb, n = modeling.embed(self.model, *chunk, max_length=self.cfg.max_length)
            tokens.append(n)
            return emb

        def loss_fn(emb):
            return in_batch_loss(emb[:num_queries], emb[num_queries:], self.cfg.temperature, doc_keys)

        loss = embed_and_backward(embed, chunks, loss_fn, cached=self.cfg.grad_cache, device=self.device, scale=scale)
        # GradCache embeds every chunk twice; count the tokens once
        return loss.item(), sum(tokens) // (2 if self.cfg.grad_cache else 1), 1.0


class UnsupervisedStage(_ContrastiveStage):
    """SimCSE: each text is embedded twice (different dropout masks) as query and positive.

    A text repeated in the file is kept once: in one batch its copies would be each other's negatives, a loss
    no update can lower."""

    def __init__(self, cfg: TrainConfig, model, device: torch.device, data: tuple[list, int]):
        super().__init__(cfg, model, device, data)
        rows, blank = data
        first = {}
        for row in rows:
            first.setdefault(row.text, row)
        self.rows = list(first.values())
        self.num_examples = len(self.rows)
        self.skipped = {"blank lines": blank, "repeated texts": len(rows) - len(self.rows)}

    def micro_step(self, indices, epoch, scale=unscaled):
        texts = [self.rows[i].text for i in indices]
        none = [None] * len(texts)
        return self._embed_all([(texts, none), (texts, none)], len(texts), scale)


class SupervisedStage(_ContrastiveStage):
    """Queries (with their instructions) against positives, hard negatives and in-batch docs; a doc text the
    global batch holds twice is one column (`in_batch_loss`'s doc_keys)."""

    def __init__(self, cfg: TrainConfig, model, device: torch.device, data: tuple[list, int]):
        super().__init__(cfg, model, device, data)
        self.rows, blank = data
        self.num_examples, self.skipped = len(self.rows), {"blank lines": blank}
        self._check_instructions()

    def _check_instructions(self):
        """DataError naming a row whose instruction leaves no text token within --max-length, now rather than
        when a batch first holds it. An instruction's tokens depend on the text after it (the two are tokenized
        together), so of each instruction's rows the one where it takes the most tokens is tokenized as
        training will."""
        groups: dict[str, list] = {}
        for row in self.rows:
            if row.instruction:
                groups.setdefault(row.instruction, []).append(row)
        for instruction, rows in groups.items():
            heads = split_instruction(self.model.tokenizer, [r.query for r in rows], instruction)
            row = max(zip(rows, heads), key=lambda pair: len(pair[1][0]))[0]
            try:
                self.model.tokenize([row.query], instruction, max_length=self.cfg.max_length)
            except ValueError as exc:
                raise DataError(f"{self.cfg.data}:{row.line}: the instruction leaves no text token in --max-length "
                                f"{self.cfg.max_length} ({exc})") from exc

    def micro_step(self, indices, epoch, scale=unscaled):
        rows = [self.rows[i] for i in indices]
        queries = ([r.query for r in rows], [r.instruction for r in rows])
        docs = [r.positive for r in rows] + [n for r in rows for n in r.negatives]
        return self._embed_all([queries, (docs, [None] * len(docs))], len(rows), scale, text_keys(docs))


_STAGES = {"compress": CompressStage, "unsupervised": UnsupervisedStage, "supervised": SupervisedStage}


def read_rows(cfg: TrainConfig) -> tuple[list, int]:
    """The rows of `cfg.data` for its stage and the blank lines left out: what needs no model, read before it
    loads, so that a wrong path or format fails at once."""
    if cfg.stage == "supervised":
        return read_pairs(cfg.data, cfg.num_negatives)
    return read_texts(cfg.data)


def build_stage(cfg: TrainConfig, model, device: torch.device, data: tuple[list, int] | None = None) -> Stage:
    """The stage of `cfg` over `data` (default: `read_rows(cfg)`)."""
    return _STAGES[cfg.stage](cfg, model, device, data if data is not None else read_rows(cfg))
