"""Bidirectional (or causal) attention for transformers decoders through `memory_attention`.

`patch_bidirectional` switches a loaded model, in place, to an attention implementation named
``"llm2comp"`` registered with transformers' `AttentionInterface`, plus a mask function of the same
name registered with `AttentionMaskInterface`. The mask function turns the 2D padding mask into
``seq_lens`` once per forward, so every layer receives the same `[B]` tensor (the op validates a
``seq_lens`` tensor once, not once per layer) instead of a dense `[B, 1, L, L]` mask. Causality is
read from each attention module's ``is_causal``, which the patch sets to False; `causal_attention`
sets it back to True for a block of code (the frozen decoder of compression training).
No model class is copied and q/k/v are handed to the kernel as the strided views the model made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from llm2comp_kernels import MEMORY_ATTENTION_BACKENDS, memory_attention

ATTN_IMPLEMENTATION = "llm2comp"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")

__all__ = ["ATTN_IMPLEMENTATION", "SUPPORTED_MODEL_TYPES", "causal_attention", "is_patched",
           "patch_bidirectional", "seq_lens_from_mask", "set_attention_dropout", "unpatch_bidirectional"]


def seq_lens_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Lengths of right-padded rows of a `[B, L]` 0/1 or bool mask, as int32 `[B]`.

    Raises ValueError for left padding, holes or empty rows: `memory_attention` needs each row's
    real tokens at positions ``0 .. len-1``.
    """
    mask = attention_mask.bool()
    # A normal (not inference-mode) tensor even under torch.inference_mode: only those carry the
    # version counter that lets memory_attention validate seq_lens once instead of once per layer.
    with torch.inference_mode(False):
        seq_lens = mask.sum(dim=1, dtype=torch.int32)
    positions = torch.arange(mask.shape[1], device=mask.device)
    # One host sync per forward: the layers then trust this tensor.
    if not torch.equal(mask, positions[None, :] < seq_lens[:, None]) or bool((seq_lens == 0).any()):
        raise ValueError("llm2comp attention needs right padding: each attention_mask row must be ones then zeros, "
                         "with at least one one (got left padding, a hole or an empty row); "
                         "set tokenizer.padding_side = 'right'")
    return seq_lens


def _llm2comp_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   attention_mask: torch.Tensor | None = None, device: torch.device | str = "cpu",
                   allow_is_causal_skip: bool = True, **_: object) -> torch.Tensor:
    """Mask function for `AttentionMaskInterface`: returns `seq_lens` int32 `[B]` instead of a mask.

    The mask pattern transformers asks for (causal, sliding window) is ignored: the attention
    function takes causality from the module and supports neither caches nor sliding windows.
    Anything more (packed sequences, custom or/and masks: transformers then turns off its causal
    skip) is refused rather than ignored.
    """
    if not allow_is_causal_skip:
        raise ValueError("llm2comp attention takes right-padded whole sequences only, and transformers asked for a "
                         "finer mask: packed sequences (position_ids that restart within a row) or a custom "
                         "or/and mask function; pad the texts into rows instead")
    if q_offset != 0 or kv_offset != 0 or q_length != kv_length:
        raise ValueError("llm2comp attention runs whole sequences only: no KV cache or generation "
                         f"(got q_length={q_length}, kv_length={kv_length}, q_offset={q_offset}); "
                         "pass use_cache=False")
    if attention_mask is None:
        return torch.full((batch_size,), kv_length, dtype=torch.int32, device=device)
    return seq_lens_from_mask(attention_mask[:, -kv_length:])


def _llm2comp_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        sliding_window: int | None = None, softcap: float | None = None,
                        **_: object) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` function: query `[B, Hq, L, d]`, key/value `[B, Hkv, L, d]` -> `[B, L, Hq, d]`.

    ``attention_mask`` is the `[B]` seq_lens tensor made by `_llm2comp_mask` (None: no padding). ``dropout``
    is the module's attention-probability dropout, which transformers passes as 0 in eval mode.
    """
    if softcap is not None:
        raise ValueError(f"llm2comp attention has no logit soft-capping (got softcap={softcap})")
    b, _, length, _ = query.shape
    if sliding_window is not None and length > sliding_window:
        raise ValueError(f"llm2comp attention has no sliding window: sequence length {length} exceeds "
                         f"the model's sliding_window={sliding_window}")
    if attention_mask is None:
        attention_mask = torch.full((b,), length, dtype=torch.int32, device=query.device)
    elif attention_mask.ndim != 1:
        raise ValueError("llm2comp attention expected the seq_lens made by its mask function, got a mask of shape "
                         f"{tuple(attention_mask.shape)}; pass a 2D attention_mask, not a prepared 4D one")
    out = memory_attention(query, key, value, attention_mask, causal=bool(module.is_causal), scale=scaling,
                           dropout_p=dropout, backend=getattr(module, "llm2comp_backend", "auto"))
    return out.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _llm2comp_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _llm2comp_mask)


def _base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel (or a peft model around one), got {type(model)}")
    return base


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "q_proj")]


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `patch_bidirectional` is in effect on `model` (not merely loaded with
    ``attn_implementation="llm2comp"``, which leaves the layers causal)."""
    base = _base_model(model)
    return base.config._attn_implementation == ATTN_IMPLEMENTATION and hasattr(base, "_llm2comp_previous_attn")


def patch_bidirectional(model: torch.nn.Module, *, backend: str = "auto", causal: bool = False) -> torch.nn.Module:
    """Make a transformers decoder attend bidirectionally through `memory_attention`, in place.

    Args:
        model: a Llama, Mistral, Qwen2, Qwen3 or Gemma model (any head, or a peft model around one).
        backend: `memory_attention` backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``, ``"flash"``.
        causal: keep causal attention (only route it through `memory_attention`).

    Returns:
        `model`. Inputs must be right padded; KV caches are not supported (pass ``use_cache=False``).
        `unpatch_bidirectional` restores the previous attention implementation and causality.
    """
    if backend not in ("auto", *MEMORY_ATTENTION_BACKENDS):
        raise ValueError(f"backend must be one of {('auto', *MEMORY_ATTENTION_BACKENDS)}, got {backend!r}")
    base = _base_model(model)
    if base.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"patch_bidirectional supports model types {SUPPORTED_MODEL_TYPES}, "
                         f"got {base.config.model_type!r}")
    modules = _attention_modules(base)
    if not modules:
        raise ValueError(f"found no attention modules (with q_proj and is_causal) in {type(base).__name__}")
    if not is_patched(base):
        base._llm2comp_previous_attn = base.config._attn_implementation
        for m in modules:
            m._llm2comp_previous_is_causal = m.is_causal
        base.set_attn_implementation(ATTN_IMPLEMENTATION)
    for m in modules:
        m.is_causal = causal
        m.llm2comp_backend = backend
    return model


def unpatch_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch_bidirectional`: previous attention implementation and `is_causal` flags. Returns `model`."""
    base = _base_model(model)
    if not is_patched(base):
        raise ValueError("model is not patched by patch_bidirectional")
    for m in _attention_modules(base):
        m.is_causal = m._llm2comp_previous_is_causal
        del m._llm2comp_previous_is_causal, m.llm2comp_backend
    base.set_attn_implementation(base._llm2comp_previous_attn)
    del base._llm2comp_previous_attn
    return model


@contextlib.contextmanager
def causal_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, a patched model attends causally (as the original decoder); restored on exit."""
    base = _base_model(model)
    if not is_patched(base):
        raise ValueError("causal_attention needs a model patched by patch_bidirectional")
    modules = _attention_modules(base)
    previous = [m.is_causal for m in modules]
    for m in modules:
        m.is_causal = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, previous, strict=True):
            m.is_causal = flag


def set_attention_dropout(model: torch.nn.Module, p: float) -> None:
    """Attention-probability dropout `p` in every attention layer of `model` (a transformers decoder or a peft
    model around one) and in its config; it acts in training mode only."""
    if not 0 <= p < 1:
        raise ValueError(f"attention dropout must be in [0, 1), got {p}")
    base = _base_model(model)
    base.config.attention_dropout = p
    for m in _attention_modules(base):
        m.attention_dropout = p
