"""What training needs from an `LLM2Comp` model, in one place: loading, the frozen decoder view,
memory states, embeddings of mixed-instruction batches, dropout and checkpointing switches."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from .. import pooling
from ..bidirectional import causal_attention, set_attention_dropout
from ..model import LLM2Comp
from ..tokenization import TokenBatch
from .config import TrainConfig

__all__ = ["load_model", "prepare_for_stage", "memory_states", "frozen_decoder", "embed", "set_lora_dropout",
           "enable_gradient_checkpointing"]


log = logging.getLogger(__name__)
MEMORY_ROWS_PARAM = "trainable_tokens_delta"  # peft's name of the memory rows (trainable_token_indices)


def load_model(cfg: TrainConfig, dtype: torch.dtype | None = None) -> LLM2Comp:
    """`cfg.model` as an LLM2Comp model: a base model gets fresh adapters, an LLM2Comp directory its own (a
    warning says so when they differ from the options). `dtype`: of the weights (None: the checkpoint's)."""
    model = LLM2Comp.from_pretrained(cfg.model, num_memory_tokens=cfg.memory_tokens, lora_rank=cfg.lora_r,
                                     lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                     backend=cfg.attention_backend, dtype=dtype, memory_init=cfg.memory_init,
                                     prepend_bos=cfg.encoder_bos)
    lora = model.model.peft_config["default"]
    kept = {"--memory-tokens": (cfg.memory_tokens, model.num_memory_tokens), "--lora-r": (cfg.lora_r, lora.r),
            "--lora-alpha": (cfg.lora_alpha, lora.lora_alpha)}
    ignored = [f"{name} {given} (the model has {has})" for name, (given, has) in kept.items() if given != has]
    if ignored:
        log.warning("%s is an LLM2Comp model and keeps its own settings, so these apply to new models only: %s",
                    cfg.model, "; ".join(ignored))
    return model


def prepare_for_stage(model: LLM2Comp, cfg: TrainConfig) -> None:
    """What the stage trains, as `cfg` says: a fresh LoRA on the loaded one folded in (``fresh_lora``), the
    memory rows frozen or not (``freeze_memory``), the LoRA and attention dropout."""
    if cfg.fresh_lora:
        model.merge_lora_and_restart()
    for name, param in model.named_parameters():
        if MEMORY_ROWS_PARAM in name:
            param.requires_grad_(not cfg.freeze_memory)
    set_lora_dropout(model, cfg.lora_dropout)
    set_attention_dropout(model.model, cfg.attention_dropout)


def memory_states(model: LLM2Comp, inputs: TokenBatch) -> torch.Tensor:
    """Last hidden states of the memory tokens, `[B, M, H]`, for a `model.tokenize` batch (encoder view)."""
    hidden = model.hidden_states(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    return pooling.memory_states(hidden, inputs, model.num_memory_tokens)


_FROZEN = "_llm2comp_in_frozen_decoder"  # model attribute: True within `frozen_decoder`


@contextlib.contextmanager
def frozen_decoder(model: LLM2Comp) -> Iterator[LLM2Comp]:
    """Within the block the model is the original LLM: adapters (LoRA, memory rows) off, causal attention, no
    attention dropout.

    Same weights, no copy: peft's ``disable_adapter`` and the patch's causal switch.
    """
    previous, dropout = getattr(model, _FROZEN, False), model.model.get_base_model().config.attention_dropout
    with model.model.disable_adapter(), causal_attention(model.model):
        setattr(model, _FROZEN, True)  # read by the checkpointing's recompute context (below)
        set_attention_dropout(model.model, 0.0)
        try:
            yield model
        finally:
            setattr(model, _FROZEN, previous)
            set_attention_dropout(model.model, dropout)


def embed(model: LLM2Comp, texts: list[str], instructions: list[str | None], *,
          max_length: int) -> tuple[torch.Tensor, int]:
    """Embeddings `[B, D]` of `texts` (train mode: dropout on) and the number of real tokens read."""
    inputs = model.tokenize(texts, instructions, max_length).to(model.device)
    return model(**inputs), int(inputs.seq_lens.sum())


def set_lora_dropout(model: LLM2Comp, p: float) -> None:
    """Dropout probability `p` on every LoRA path (peft puts an Identity there when built with 0), and
    in the LoRA config that `save_pretrained` writes."""
    for config in model.model.peft_config.values():
        config.lora_dropout = p
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name in list(dropouts):
                dropouts[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


def enable_gradient_checkpointing(model: LLM2Comp) -> None:
    """Recompute each layer in backward (non-reentrant: gradients reach the LoRA and memory rows).

    A layer run inside `frozen_decoder` is recomputed inside it too: the recompute happens in
    backward, after the block has exited, and would otherwise run with the adapters on and
    bidirectional attention (other values, so wrong gradients or a CheckpointError).
    """
    def context_fn():
        frozen = getattr(model, _FROZEN, False)
        return contextlib.nullcontext(), frozen_decoder(model) if frozen else contextlib.nullcontext()

    base, kwargs = model.model.get_base_model(), {"use_reentrant": False, "context_fn": context_fn}
    if hasattr(base, "activation_checkpointing_enable"):  # the new name; the old one warns it goes in v6
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
