"""Encoding on one device: the batch loop that `encode_texts` runs here and each `EncodePool` worker runs there.

Texts are sorted longest first (so each batch pads little and the first batch shows the peak memory), embedded
in inference mode (on GPU, when the model is float32: bf16 autocast, or fp16 on GPUs without bf16) and put back
in input order. On the CPU the adapted layers run on merged weights (`llm2comp.merged_weights`).
"""

from __future__ import annotations

import numpy as np
import torch

from .merged_weights import merged_weights
from .precision import half_dtype

__all__ = ["encode_batches"]


def encode_batches(model, texts: list[str], batch_size: int, show_progress_bar: bool, device, *, instruction,
                 max_length: int, pooling: str, autocast: bool) -> torch.Tensor:
    """float32 `[n, D]` embeddings of `texts`, in order, on the model's device (moved to `device` first): the
    checked options of `encode_texts`, here or in a pool's worker."""
    if device is not None:
        model.to(device)
    device = model.device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    starts = range(0, len(texts), batch_size)
    if show_progress_bar:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="Batches", unit="batch")
    autocast = autocast and device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    was_training = model.training
    toggle = any(m.training for m in model.modules())  # eval() and back walk every module: only where one trains
    if toggle:
        model.eval()
    chunks = []
    try:
        with (torch.inference_mode(), torch.autocast("cuda", dtype=half_dtype(device), enabled=autocast),
              merged_weights(model, keep=not was_training)):
            for s in starts:
                batch = model.tokenize([texts[i] for i in order[s:s + batch_size]], instruction, max_length)
                chunks.append(model(**batch.to(device), pooling=pooling).float())
    finally:
        if toggle:
            model.train(was_training)
    if not chunks:
        return torch.zeros(0, model.hidden_size, device=device)
    return torch.cat(chunks)[torch.as_tensor(np.argsort(order), dtype=torch.long, device=device)]
