"""`encode` for `LLM2Comp`, with sentence-transformers semantics: checks the arguments, then encodes on one
device (`llm2comp.encode_loop`) or hands the texts to a pool of workers (`llm2comp.multi_process`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch

from .encode_loop import encode_batches
from .multi_process import EncodePool, is_device_list
from .pooling import POOLINGS, check_poolable, check_pooling
from .precision import has_bf16
from .quantization import check_precision, quantize_embeddings

__all__ = ["POOLINGS", "check_pooling", "cosine_similarity", "encode_texts"]

PROGRESS_BAR_MIN_BATCHES = 5


def check_sentences(sentences, pooling: str) -> tuple[list[str], bool]:
    """(texts, single): a str, or any iterable of str (list, tuple, numpy array, pandas Series...)."""
    single = isinstance(sentences, str)
    if single:
        texts = [sentences]
    elif isinstance(sentences, (bytes, bytearray)):
        raise TypeError("sentences is bytes; decode it to str first")
    elif isinstance(sentences, Mapping) or not isinstance(sentences, Iterable):
        raise TypeError(f"sentences must be a str or a sequence of str, got {type(sentences).__name__}")
    else:
        texts = list(sentences)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            hint = "; decode it to str first" if isinstance(t, (bytes, bytearray)) else ""
            raise TypeError(f"sentences[{i}] is {type(t).__name__}, expected str{hint}")
    check_poolable(texts, pooling)
    return texts, single


def encode_texts(model, sentences: str | Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None,
                 instruction: str | None = None, batch_size: int = 32, max_length: int = 512,
                 pooling: str | None = None, normalize_embeddings: bool = False, truncate_dim: int | None = None,
                 precision: str = "float32", convert_to_numpy: bool = True, convert_to_tensor: bool = False,
                 show_progress_bar: bool | None = None, device: torch.device | str | Sequence | None = None,
                 pool=None, autocast: bool = True):
    """Embed `sentences` with an `LLM2Comp` model.

    Args:
        model: the `LLM2Comp` model.
        sentences: one str (returns `[D]`) or n str in any iterable (list, numpy array, pandas Series...;
            returns `[n, D]`, n = 0 gives `[0, D]`). Empty texts are allowed with memory pooling.
        prompt_name: the model's prompt of this name (`model.prompts`) precedes every text; default the model's
            `default_prompt_name`, if set.
        prompt, instruction: a prompt given as text (two names for one thing: sentence-transformers' and the
            paper's), e.g. ``"Instruct: ...\\nQuery: "``; it wins over `prompt_name`. A prompt is read by the
            memory tokens and kept out of mean pooling.
        batch_size: texts per forward.
        max_length: tokens per row, including BOS, instruction and memory tokens (texts are truncated).
        pooling: ``"memory"``, ``"mean"`` or ``"last"``; default the model's.
        normalize_embeddings: L2-normalise each embedding (after `truncate_dim`).
        truncate_dim: keep the first `truncate_dim` dimensions (Matryoshka style); default the model's
            `truncate_dim` (None: all).
        precision: ``"float32"`` or a quantization (`llm2comp.quantization`: int8, uint8, binary, ubinary), as
            sentence-transformers' ``quantize_embeddings`` over the embeddings of this call.
        convert_to_numpy, convert_to_tensor: float32 numpy array (default) or torch tensor on the model's
            device, or on the CPU with several devices (convert_to_tensor wins); otherwise a list of 1-D tensors
            (one tensor for a str).
        show_progress_bar: tqdm bar; None shows it for 5 or more batches.
        device: move the model there first; a list of devices (``["cuda:0", "cuda:1"]``) encodes on all of them
            at once, in worker processes started for this call (`llm2comp.multi_process`).
        pool: an `EncodePool` of this model (`LLM2Comp.start_multi_process_pool`), to reuse its workers.
        autocast: on GPU, run a float32 model in bf16 autocast (fp16 on GPUs without bf16); False runs it in
            its own dtype (float32: slower, but no fp16 overflow).

    Warns when embeddings come out non-finite (NaN/inf), as fp16 overflow gives them.
    """
    pooling = check_pooling(pooling or model.pooling)
    texts, single = check_sentences(sentences, pooling)
    instruction = resolve_prompt(model, prompt_name, prompt, instruction)
    truncate_dim = check_truncate_dim(truncate_dim if truncate_dim is not None else model.truncate_dim,
                                      model.hidden_size)
    check_precision(precision)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if show_progress_bar is None:
        show_progress_bar = math.ceil(len(texts) / batch_size) >= PROGRESS_BAR_MIN_BATCHES
    if not isinstance(autocast, bool):
        raise TypeError(f"autocast must be a bool, got {type(autocast).__name__}")
    options = {"instruction": instruction, "max_length": max_length, "pooling": pooling, "autocast": autocast}
    several = is_device_list(device)
    if pool is not None and device is not None:
        raise ValueError("give device or pool, not both (a pool's devices are fixed when it starts)")
    if pool is not None and not pool.belongs_to(model):
        raise ValueError("pool was started from another model (start_multi_process_pool of this one)")
    if several and not texts:  # no workers to start for nothing
        out, devices = torch.zeros(0, model.hidden_size), []
    elif several:
        with EncodePool(model, device) as pool:
            out, devices = pool.encode(texts, batch_size, show_progress_bar, **options), pool.devices
    elif pool is not None:
        out, devices = pool.encode(texts, batch_size, show_progress_bar, **options), pool.devices
    else:
        out = encode_batches(model, texts, batch_size, show_progress_bar, device, **options)
        devices = [model.device]
    _warn_non_finite(out, model, autocast, devices)
    return finish_embeddings(out, single=single, truncate_dim=truncate_dim, normalize_embeddings=normalize_embeddings,
                             precision=precision, convert_to_numpy=convert_to_numpy,
                             convert_to_tensor=convert_to_tensor)


def finish_embeddings(out: torch.Tensor, *, single: bool, truncate_dim: int | None, normalize_embeddings: bool,
                      precision: str, convert_to_numpy: bool, convert_to_tensor: bool):
    """`encode`'s return value from float32 embeddings `out` `[n, D]`, in sentence-transformers' order:
    truncate, normalize, quantize, convert; `single`: the one row `[D]` of a str."""
    if truncate_dim is not None:
        out = out[:, :truncate_dim]
    if normalize_embeddings:
        out = torch.nn.functional.normalize(out, dim=-1)
    if precision != "float32":
        out = torch.from_numpy(quantize_embeddings(out, precision))
    if single:
        out = out[0]
    if convert_to_tensor or (single and not convert_to_numpy):
        return out
    if convert_to_numpy:
        return out.cpu().numpy()
    return list(out)


def resolve_prompt(model, prompt_name: str | None, prompt: str | None, instruction: str | None) -> str | None:
    """The text that precedes every text: `prompt` or `instruction` (not both), else the model's prompt
    `prompt_name`, else its `default_prompt_name`'s, else None."""
    if prompt is not None and instruction is not None and prompt != instruction:
        raise ValueError("give prompt or instruction, not both (two names for the text before each text)")
    text = prompt if prompt is not None else instruction
    if text is not None and not isinstance(text, str):
        raise TypeError(f"{'prompt' if prompt is not None else 'instruction'} must be a str, got {type(text).__name__}")
    if text is not None:
        if prompt_name is not None:
            warnings.warn(f"prompt_name {prompt_name!r} is ignored: a prompt was given as text", stacklevel=3)
        return text
    if prompt_name is None:
        prompt_name = model.default_prompt_name
        if prompt_name is None:
            return None
    if prompt_name not in model.prompts:
        raise ValueError(f"prompt_name {prompt_name!r} is not one of the model's prompts "
                         f"({', '.join(map(repr, model.prompts)) or 'it has none'}); set model.prompts, or pass "
                         "prompts= to from_pretrained")
    return model.prompts[prompt_name]


def check_truncate_dim(truncate_dim: int | None, hidden_size: int) -> int | None:
    """`truncate_dim` if None or an int in 1..hidden_size, else an error naming it."""
    if truncate_dim is None:
        return None
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int):
        raise TypeError(f"truncate_dim must be an int or None, got {type(truncate_dim).__name__}")
    if not 1 <= truncate_dim <= hidden_size:
        raise ValueError(f"truncate_dim must be in 1..{hidden_size} (the embedding size), got {truncate_dim}")
    return truncate_dim


def check_prompts(prompts, default_prompt_name) -> tuple[dict[str, str], str | None]:
    """(prompts, default_prompt_name), checked: a dict of str -> str, and None or one of its names."""
    if not isinstance(prompts, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in prompts.items()):
        raise TypeError(f"prompts must be a dict of name -> prompt text (str -> str), got {prompts!r}")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                         f"({', '.join(map(repr, prompts)) or 'none given'})")
    return dict(prompts), default_prompt_name


def _warn_non_finite(out: torch.Tensor, model, autocast: bool, devices: list[torch.device]) -> None:
    """Warn of non-finite embeddings, naming float16, which overflows on some models, where it ran (`devices`)."""
    bad = int((~torch.isfinite(out).all(dim=-1)).sum()) if out.numel() else 0
    if not bad:
        return
    dtype = next(model.parameters()).dtype
    cause = ""
    if dtype == torch.float16:
        cause = " (the model is float16, which overflows on some models: load it with dtype=torch.float32)"
    elif dtype == torch.float32 and autocast and any(d.type == "cuda" and not has_bf16(d) for d in devices):
        cause = (" (float16 autocast, as this GPU has no bf16, overflows on some models: encode(..., "
                 "autocast=False) runs in float32)")
    warnings.warn(f"{bad} of {out.shape[0]} embeddings are not finite (NaN or inf){cause}", stacklevel=3)


ENCODE_OPTIONS = tuple(p for p in inspect.signature(encode_texts).parameters if p not in ("model", "sentences"))


def check_encode_kwargs(kwargs: dict) -> None:
    """Raise TypeError naming unknown `encode` keyword arguments and listing the valid ones."""
    unknown = sorted(set(kwargs) - set(ENCODE_OPTIONS))
    if unknown:
        raise TypeError(f"encode() got unknown keyword arguments {unknown}; valid: {', '.join(ENCODE_OPTIONS)}")


def cosine_similarity(a, b) -> torch.Tensor:
    """Cosine similarities float32 `[n, m]` of embeddings `a` `[n, D]` and `b` `[m, D]` (numpy arrays or tensors;
    a `[D]` one is one row), on `a`'s device, as sentence-transformers' ``similarity``."""
    rows = []
    for name, x in (("a", a), ("b", b)):
        x = torch.as_tensor(x)
        if x.dim() not in (1, 2) or not x.is_floating_point():
            raise ValueError(f"{name} must be float embeddings [n, D] or [D], got {x.dtype} of shape {tuple(x.shape)}")
        rows.append(x.reshape(-1, x.shape[-1]).float())
    a, b = rows[0], rows[1].to(rows[0].device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b have embeddings of different sizes: {a.shape[1]} and {b.shape[1]}")
    return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
