"""MTEB with LLM2Comp: `MTEBEncoder`, the MTEB 2.x encoder protocol, with E5-style per-task instructions
(``Instruct: {task}\\nQuery: {text}`` for queries and symmetric tasks, none for documents).

mteb itself is imported only for `MTEBEncoder.mteb_model_meta`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..model import LLM2Comp
from ..multi_process import is_device_list

__all__ = ["MTEBEncoder", "e5_instruction"]

E5_TEMPLATE = "Instruct: {task}\nQuery: "


def e5_instruction(task: str) -> str:
    """``"Instruct: {task}\\nQuery: "``, the E5-mistral / LLM2Vec instruction prefix."""
    return E5_TEMPLATE.format(task=task)


class MTEBEncoder:
    """MTEB 2.x encoder (``mteb.models.EncoderProtocol``) for an `LLM2Comp` model.

    Args:
        model_name: an LLM2Comp directory or any name `LLM2Comp.from_pretrained` takes; or pass `model`.
        revision: the hub revision `model_name` is loaded at (it names a local directory's files otherwise),
            recorded in the model metadata.
        device: where to run (default: CUDA when available for a model loaded here, else where `model` is); a
            list of devices encodes on all of them (`LLM2Comp.start_multi_process_pool`; `close()` stops the
            workers, as does a ``with`` block).
        model: an already loaded `LLM2Comp` (then `model_name` is only its name).
        instructions: task name -> task description for the instruction; tasks not listed use
            their MTEB description.
        batch_size, max_length: `LLM2Comp.encode` settings.
    """

    def __init__(self, model_name: str, revision: str | None = None, *, device: str | list | None = None,
                 model: LLM2Comp | None = None, instructions: dict[str, str] | None = None,
                 batch_size: int = 32, max_length: int = 512):
        several = is_device_list(device)
        if device is None and model is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:  # with several devices: on the CPU, from where the workers get it
            model = LLM2Comp.from_pretrained(model_name, device="cpu" if several else device,
                                             **({"revision": revision} if revision else {}))
        self.model = model
        if device is not None and not several:
            self.model.to(device)
        self.pool = self.model.start_multi_process_pool(device) if several else None
        self.model_name, self.revision = model_name, revision
        self.instructions = dict(instructions or {})
        self.batch_size, self.max_length = batch_size, max_length

    def instruction(self, task_metadata, prompt_type=None) -> str:
        """E5-style instruction for a task, or "" (none, not the model's default prompt) for the document side of
        retrieval-like tasks."""
        if prompt_type is not None and str(getattr(prompt_type, "value", prompt_type)) == "document":
            return ""
        task = self.instructions.get(task_metadata.name) or task_metadata.description
        return e5_instruction(task.strip())

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        """Embed every ``"text"`` of the batches in `inputs` (an MTEB DataLoader) -> float32 `[n, D]`."""
        texts = [text for batch in inputs for text in batch["text"]]
        return self.model.encode(texts, instruction=self.instruction(task_metadata, prompt_type),
                                 batch_size=kwargs.get("batch_size", self.batch_size), max_length=self.max_length,
                                 show_progress_bar=kwargs.get("show_progress_bar"), pool=self.pool)

    def close(self) -> None:
        """Stop the workers of a multi-device encoder (nothing otherwise)."""
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> MTEBEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity matrix `[n1, n2]`."""
        a = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings1), dtype=torch.float32), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings2), dtype=torch.float32), dim=-1)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity of matching rows `[n]`."""
        a = torch.as_tensor(np.asarray(embeddings1), dtype=torch.float32)
        b = torch.as_tensor(np.asarray(embeddings2), dtype=torch.float32)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    @property
    def mteb_model_meta(self):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        base = self.model.model.get_base_model()
        return ModelMeta(loader=None, name=self.model_name if "/" in self.model_name else f"llm2comp/{self.model_name}",
                         revision=self.revision, release_date=None, languages=None,
                         n_parameters=sum(p.numel() for p in base.parameters()), memory_usage_mb=None,
                         max_tokens=self.max_length, embed_dim=self.model.hidden_size, license=None,
                         open_weights=True, public_training_code=None, public_training_data=None,
                         similarity_fn_name=ScoringFunction.COSINE, framework=["PyTorch"], reference=None,
                         use_instructions=True, training_datasets=None)
