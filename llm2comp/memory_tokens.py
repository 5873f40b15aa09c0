"""Memory tokens: M new special tokens appended to every text; their mean last hidden state is the embedding."""

from __future__ import annotations

import torch

__all__ = ["MEMORY_INITS", "add_memory_tokens", "init_memory_rows", "memory_token_names"]

# How new memory rows start: "random" draws each row from a normal with the per-dimension mean and standard
# deviation of the existing rows (distinct rows at the scale of real tokens, the same draw every time: seed 0);
# "mean" sets every row to the mean row (the rows then differ only by position).
MEMORY_INITS = ("random", "mean")


def memory_token_names(num: int) -> list[str]:
    """``["<mem_0>", ..., "<mem_{num-1}>"]``."""
    return [f"<mem_{i}>" for i in range(num)]


def add_memory_tokens(model: torch.nn.Module, tokenizer, num: int = 8, init: str = "random") -> list[int]:
    """Add `num` special tokens ``<mem_i>`` to `tokenizer` and matching embedding rows to `model`, in place.

    The input embedding (and a tied LM head with it) grows to ``len(tokenizer)`` rows; the new rows start
    as `init` says (`MEMORY_INITS`). A separate LM head gets the same initialisation. Making only these rows
    trainable is left to the caller: `LLM2Comp` does it with peft's ``trainable_token_indices`` (the base
    embedding stays frozen and the new rows live in the adapter).

    Args:
        model: a transformers model (with `get_input_embeddings` / `resize_token_embeddings`).
        tokenizer: its tokenizer (fast or slow); gains the tokens as special tokens.
        num: M >= 1.
        init: one of `MEMORY_INITS`.

    Returns:
        The M token ids, in order.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if init not in MEMORY_INITS:
        raise ValueError(f"init must be one of {MEMORY_INITS}, got {init!r}")
    names = memory_token_names(num)
    vocab = tokenizer.get_vocab()
    if any(name in vocab for name in names):
        raise ValueError(f"tokenizer already has memory tokens {names[0]}..; load it as an LLM2Comp model instead")
    tokenizer.add_tokens(names, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    init_memory_rows(model, tokenizer, ids, init)
    return ids


def init_memory_rows(model: torch.nn.Module, tokenizer, ids: list[int], init: str = "random") -> None:
    """Grow `model`'s embeddings to fit `tokenizer` and set rows `ids` from the older rows as `init` says.

    Also used when a saved model is loaded, so that rows outside the adapter (an untied LM head's)
    match the ones it was trained with (both inits are deterministic).
    """
    old_rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= old_rows:
        # mean_resizing=False: rows are set below; transformers' default samples them randomly.
        model.resize_token_embeddings(max(len(tokenizer), old_rows), mean_resizing=False)
    old_rows = min(old_rows, min(ids))
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m}.values():
            weight = layer.weight
            old = weight[:old_rows].float()
            rows = old.mean(dim=0).expand(len(ids), -1)
            if init == "random":
                noise = torch.randn(len(ids), old.shape[1], generator=torch.Generator().manual_seed(0))
                rows = rows + old.std(dim=0) * noise.to(old.device)
            weight[ids] = rows.to(weight.dtype)
