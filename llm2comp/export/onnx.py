"""`export_onnx`: an `LLM2Comp` encoder as one ONNX graph from token ids to pooled embeddings.

The graph takes the rows `LLM2Comp.tokenize` makes, ``input_ids`` and ``attention_mask`` int64 `[B, L]` (right
padded; both axes dynamic), and returns ``embeddings`` float32 `[B, D]` pooled as the model pools by default
(``"memory"``: the mean of the last M real positions; ``"last"``: the position before them; ``"mean"``: the text
tokens, for which the graph takes a third input ``text_start`` int64 `[B]`, where the instruction ends). Inside it:
the decoder body (no LM head) of a copy of the model with the LoRA adapters and the memory-token rows folded into
its weights, in float32, whose attention is bidirectional over the real tokens (a key-padding mask, no causal
mask). `llm2comp.export.onnx_runtime.OnnxEncoder` runs it with onnxruntime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch
from transformers import AttentionInterface

from ..pooling import check_pooling
from .onnx_runtime import ONNX_CONFIG_NAME, ONNX_FORMAT, ONNX_MODEL_NAME, OnnxEncoder

__all__ = ["EXPORT_ATTENTION", "ONNX_CONFIG_NAME", "ONNX_MODEL_NAME", "EmbeddingGraph", "OnnxEncoder", "export_onnx"]

EXPORT_ATTENTION = "llm2comp_export"
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (a protobuf file holds at most 2 GiB)


def _key_padding_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           softcap: float | None = None, **_: object) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` function of the exported graph: query `[B, Hq, L, d]`, key/value `[B, Hkv, L, d]`,
    `attention_mask` a bool key-padding mask `[B, 1, 1, L]` (True: a real token) -> `[B, L, Hq, d]`. Every query
    attends to every real key: bidirectional, as `memory_attention` in an `LLM2Comp`."""
    if softcap is not None:
        raise ValueError(f"llm2comp attention has no logit soft-capping (got softcap={softcap})")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(EXPORT_ATTENTION, _key_padding_attention)


class EmbeddingGraph(torch.nn.Module):
    """What the ONNX graph computes: ``(input_ids, attention_mask[, text_start]) -> embeddings [B, D]``.

    `body` is the decoder body (embeddings, layers, final norm) of a merged model whose attention implementation is
    `EXPORT_ATTENTION`; `pooling` and `num_memory_tokens` as the `LLM2Comp` it came from.
    """

    def __init__(self, body: torch.nn.Module, pooling: str, num_memory_tokens: int):
        super().__init__()
        self.body, self.pooling, self.num_memory_tokens = body, check_pooling(pooling), num_memory_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                text_start: torch.Tensor | None = None) -> torch.Tensor:
        real = attention_mask.bool()
        # a 4D mask: transformers hands it to the attention function as it is
        out = self.body(input_ids=input_ids, attention_mask=real[:, None, None, :], use_cache=False)
        hidden = out.last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        seq_lens = attention_mask.sum(dim=1, keepdim=True)
        memory_start = seq_lens - self.num_memory_tokens
        if self.pooling == "memory":
            weights = (positions >= memory_start) & real
        elif self.pooling == "last":
            weights = positions == memory_start - 1
        else:  # "mean": the text tokens, text_start .. memory_start - 1
            weights = (positions >= text_start[:, None]) & (positions < memory_start)
        weights = weights.to(hidden.dtype)
        pooled = torch.einsum("bl,bld->bd", weights, hidden) / weights.sum(dim=1, keepdim=True)
        return pooled.float()


def _merged_body(model) -> torch.nn.Module:
    """The decoder body of a float32 CPU copy of `model` (an `LLM2Comp`) with its LoRA adapters and memory rows
    folded into the weights and `EXPORT_ATTENTION` as its attention; `model` itself is left as it was."""
    merged = model.merged_copy(torch.float32)
    merged.set_attn_implementation(EXPORT_ATTENTION)
    for module in merged.modules():
        if hasattr(module, "is_causal") and hasattr(module, "q_proj"):
            module.is_causal = False
    merged.eval()
    body = merged.get_decoder()
    for p in body.parameters():
        p.requires_grad_(False)
    return body


@contextlib.contextmanager
def _quiet_registry():
    """Without the exporter's log lines about torchvision's operators (not installed, and not used here)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _example_batch(model) -> dict[str, torch.Tensor]:
    """Rows of different lengths (one padded), for tracing; the graph's shapes stay dynamic."""
    texts = ["An example text of several words, traced into the graph.", "Short text."]
    batch = model.tokenize(texts, max_length=model.max_positions)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "text_start": batch.text_start}


def export_onnx(model, directory: str | Path, *, opset: int | None = None) -> Path:
    """Write `model` (an `LLM2Comp`) into `directory` as an ONNX graph with what `OnnxEncoder` needs to run it.

    Files: ``model.onnx`` (plus ``model.onnx.data`` for weights over 1 GiB), the tokenizer, and
    ``llm2comp_onnx.json`` (pooling, memory token ids, BOS ids, pad id, hidden size, the default max_length, the
    graph's inputs and output, and the model's `encode` defaults: prompts, default_prompt_name, truncate_dim). The
    graph is float32 whatever the model's dtype, and computes the embedding the model's `encode` gives (its default
    pooling) from ``input_ids`` and ``attention_mask`` as `LLM2Comp.tokenize` makes them (plus ``text_start`` for
    "mean" pooling). The model is copied, never changed.

    Args:
        model: the `LLM2Comp` to export.
        directory: the output directory (made if missing; earlier export files in it are replaced).
        opset: the ONNX opset (default: torch's exporter's).

    Returns:
        The path of ``model.onnx``.
    """
    import onnx  # noqa: F401  (torch.onnx's exporter needs it; fail early with the package's name)
    import onnxscript  # noqa: F401

    from ..model import LLM2Comp

    if not isinstance(model, LLM2Comp):
        raise TypeError(f"model must be an LLM2Comp, got {type(model).__name__}")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 1):
        raise ValueError(f"opset must be a positive int, got {opset!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    graph = EmbeddingGraph(_merged_body(model), model.pooling, model.num_memory_tokens).eval()
    example = _example_batch(model)
    inputs = ["input_ids", "attention_mask"] + (["text_start"] if model.pooling == "mean" else [])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}, "text_start": {0: batch}}
    weight_bytes = sum(p.numel() * 4 for p in graph.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES

    path = directory / ONNX_MODEL_NAME
    for stale in (path, directory / f"{ONNX_MODEL_NAME}.data", directory / ONNX_CONFIG_NAME):
        stale.unlink(missing_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_registry():
        # the exporter's notes that batch / sequence name axes of both inputs, and a deprecation inside torch
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(graph, args=(), kwargs={k: example[k] for k in inputs}, dynamo=True,
                                    input_names=inputs, output_names=["embeddings"], opset_version=opset,
                                    dynamic_shapes={k: shapes[k] for k in inputs}, optimize=True, verbose=False)
        program.save(str(path), external_data=external)
    model.tokenizer.save_pretrained(str(directory))
    config = {
        "format": ONNX_FORMAT, "version": 1, "model_file": ONNX_MODEL_NAME, "external_data": external,
        "inputs": inputs, "output": "embeddings", "dtype": "float32",
        "opset": next(o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")),
        "pooling": model.pooling, "num_memory_tokens": model.num_memory_tokens,
        "memory_token_ids": list(model.memory_token_ids), "prepend_bos": model.prepend_bos,
        "bos_ids": list(model.bos_ids), "pad_token_id": int(model.pad_token_id),
        "hidden_size": int(model.hidden_size), "max_positions": int(model.max_positions),
        "max_length": min(512, int(model.max_positions)),
        "prompts": model.prompts, "default_prompt_name": model.default_prompt_name, "truncate_dim": model.truncate_dim,
    }
    (directory / ONNX_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return path
