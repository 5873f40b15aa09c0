"""`OnnxEncoder`: embeddings from a directory `llm2comp.export.onnx.export_onnx` wrote, with onnxruntime.

The directory holds ``model.onnx`` (token ids and attention mask in, pooled float32 embeddings out), the tokenizer
and ``llm2comp_onnx.json`` (pooling, memory token ids, BOS ids, pad id, sizes, and the model's `encode` defaults:
prompts, default_prompt_name, truncate_dim). Rows are built exactly as
`LLM2Comp.tokenize` builds them, by the same functions (`llm2comp.tokenization`) on the saved tokenizer:
``[BOS] instruction text <mem_0..M-1> <pad>...``, right padded. No torch model is loaded.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import tokenization
from ..encode import check_prompts, check_sentences, check_truncate_dim, finish_embeddings, resolve_prompt
from ..pooling import POOLINGS
from ..quantization import check_precision

__all__ = ["ONNX_CONFIG_NAME", "ONNX_FORMAT", "ONNX_MODEL_NAME", "OnnxEncoder"]

ONNX_MODEL_NAME = "model.onnx"
ONNX_CONFIG_NAME = "llm2comp_onnx.json"
ONNX_FORMAT = "llm2comp-onnx"
PROGRESS_BAR_MIN_BATCHES = 5  # as `LLM2Comp.encode`


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not _is_bool(value)


def read_onnx_config(directory: Path) -> dict:
    """The checked ``llm2comp_onnx.json`` of an exported directory."""
    path = directory / ONNX_CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {directory} is not an llm2comp ONNX export "
                                "(llm2comp export MODEL OUT --format onnx)") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != ONNX_FORMAT or config.get("version") != 1:
        raise ValueError(f"{path}: not an {ONNX_FORMAT} config version 1")
    for key, kind in (("pooling", str), ("num_memory_tokens", int), ("memory_token_ids", list), ("bos_ids", list),
                      ("pad_token_id", int), ("hidden_size", int), ("max_positions", int), ("max_length", int),
                      ("inputs", list), ("output", str)):
        if not isinstance(config.get(key), kind):
            raise ValueError(f"{path}: {key!r} is {'missing' if key not in config else 'not a ' + kind.__name__}")
    if config["pooling"] not in POOLINGS:
        raise ValueError(f"{path}: pooling {config['pooling']!r} is not one of {POOLINGS}")
    if len(config["memory_token_ids"]) != config["num_memory_tokens"]:
        raise ValueError(f"{path}: memory_token_ids {config['memory_token_ids']} are not num_memory_tokens "
                         f"({config['num_memory_tokens']}) ids")
    try:  # absent in exports made before them
        config["prompts"], config["default_prompt_name"] = check_prompts(config.get("prompts", {}),
                                                                         config.get("default_prompt_name"))
        config["truncate_dim"] = check_truncate_dim(config.get("truncate_dim"), config["hidden_size"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    return config


class OnnxEncoder:
    """An exported LLM2Comp encoder on onnxruntime: ``OnnxEncoder(directory).encode(texts)``.

    Args:
        directory: what `llm2comp.export.onnx.export_onnx` wrote.
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph optimisation level), or None.
    """

    def __init__(self, directory: str | Path, *, providers: Sequence[str] | None = None, session_options=None):
        import onnxruntime
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"directory {self.directory} does not exist")
        self.config = read_onnx_config(self.directory)
        graph = self.directory / self.config.get("model_file", ONNX_MODEL_NAME)
        if not graph.is_file():
            raise FileNotFoundError(f"{graph} is missing (the exported graph)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        self.session = onnxruntime.InferenceSession(str(graph), sess_options=session_options,
                                                    providers=list(providers or ["CPUExecutionProvider"]))
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(self.config["inputs"]):
            raise ValueError(f"{graph} takes inputs {names}, {ONNX_CONFIG_NAME} says {self.config['inputs']}")
        self.pooling: str = self.config["pooling"]
        self.memory_token_ids: list[int] = list(self.config["memory_token_ids"])
        self.num_memory_tokens: int = self.config["num_memory_tokens"]
        self.bos_ids: list[int] = list(self.config["bos_ids"])
        self.pad_token_id: int = self.config["pad_token_id"]
        self.hidden_size: int = self.config["hidden_size"]
        self.max_positions: int = self.config["max_positions"]
        # `encode`'s defaults, as the exported model's
        self.prompts: dict[str, str] = self.config["prompts"]
        self.default_prompt_name: str | None = self.config["default_prompt_name"]
        self.truncate_dim: int | None = self.config["truncate_dim"]

    def __repr__(self) -> str:
        return (f"OnnxEncoder({str(self.directory)!r}, pooling={self.pooling!r}, "
                f"num_memory_tokens={self.num_memory_tokens}, hidden_size={self.hidden_size})")

    # ----------------------------------------------------------------------------- tokenizing
    def tokenize(self, texts: Sequence[str], instruction: str | None = None,
                 max_length: int = 512) -> dict[str, np.ndarray]:
        """`LLM2Comp.tokenize` as int64 numpy arrays: ``input_ids``, ``attention_mask`` `[B, L]` and ``seq_lens``,
        ``memory_start``, ``text_start`` `[B]`."""
        texts = list(texts)
        rows = tokenization.split_instruction(self.tokenizer, texts, instruction)
        batch = tokenization.pack(rows, bos=self.bos_ids, memory_token_ids=self.memory_token_ids,
                                  pad_token_id=self.pad_token_id, max_length=min(max_length, self.max_positions))
        return {name: tensor.numpy() for name, tensor in batch.items()}

    def embed_batch(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """float32 `[B, D]` embeddings of a `tokenize` batch (the graph's inputs are read from it by name)."""
        feed = {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in self.config["inputs"]}
        return self.session.run([self.config["output"]], feed)[0].astype(np.float32, copy=False)

    # ----------------------------------------------------------------------------- encoding
    def encode(self, sentences: str | Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None,
               instruction: str | None = None, batch_size: int = 32, max_length: int = 512,
               normalize_embeddings: bool = False, truncate_dim: int | None = None, precision: str = "float32",
               convert_to_numpy: bool = True, convert_to_tensor: bool = False, show_progress_bar: bool | None = None):
        """Embed texts as `LLM2Comp.encode` does: a str gives `[D]`, n str (any iterable) give `[n, D]` (float32
        unless quantized).

        prompt_name: the exported model's prompt of this name (`prompts`) precedes every text; default its
        `default_prompt_name`, if set. prompt, instruction: a prompt given as text (two names for one thing); it
        wins over prompt_name, and "mean" pooling leaves it out. batch_size: texts per graph run. max_length:
        tokens per row, BOS, prompt and memory tokens included (texts are truncated). normalize_embeddings:
        L2-normalise each embedding (after truncate_dim). truncate_dim: keep the first dimensions; default the
        exported model's `truncate_dim` (None: all). precision: "float32" or a quantization
        (`llm2comp.quantization`: int8, uint8, binary, ubinary) of this call's embeddings. convert_to_numpy
        (default) gives a numpy array, convert_to_tensor a torch tensor; both False a list of 1-D tensors (one
        tensor for a str). show_progress_bar: a tqdm bar; None shows it for 5 or more batches.
        """
        texts, single = check_sentences(sentences, self.pooling)
        instruction = resolve_prompt(self, prompt_name, prompt, instruction)
        truncate_dim = check_truncate_dim(truncate_dim if truncate_dim is not None else self.truncate_dim,
                                          self.hidden_size)
        check_precision(precision)
        self._check_options(batch_size, max_length, normalize_embeddings, convert_to_numpy, convert_to_tensor,
                            show_progress_bar)
        starts = range(0, len(texts), batch_size)
        if show_progress_bar is None:
            show_progress_bar = math.ceil(len(texts) / batch_size) >= PROGRESS_BAR_MIN_BATCHES
        if show_progress_bar:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="Batches", unit="batch")
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first: little padding per batch
        chunks = [self.embed_batch(self.tokenize([texts[i] for i in order[s:s + batch_size]], instruction,
                                                 max_length)) for s in starts]
        out = np.zeros((0, self.hidden_size), np.float32)
        if chunks:
            out = np.concatenate(chunks)[np.argsort(order)]
        bad = int((~np.isfinite(out).all(axis=-1)).sum()) if out.size else 0
        if bad:
            warnings.warn(f"{bad} of {out.shape[0]} embeddings are not finite (NaN or inf)", stacklevel=2)
        return finish_embeddings(torch.from_numpy(np.ascontiguousarray(out)), single=single, truncate_dim=truncate_dim,
                                 normalize_embeddings=normalize_embeddings, precision=precision,
                                 convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor)

    @staticmethod
    def _check_options(batch_size, max_length, normalize_embeddings, convert_to_numpy, convert_to_tensor,
                       show_progress_bar) -> None:
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("normalize_embeddings", normalize_embeddings), ("convert_to_numpy", convert_to_numpy),
                            ("convert_to_tensor", convert_to_tensor)):
            if not _is_bool(value):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if show_progress_bar is not None and not _is_bool(show_progress_bar):
            raise TypeError(f"show_progress_bar must be a bool or None, got {type(show_progress_bar).__name__}")
