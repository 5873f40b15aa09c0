"""sentence-transformers with LLM2Comp: the encoder as a sentence-transformers module, and losses computed by
`llm2comp_kernels.contrastive_loss`.

`LLM2CompModule` is a sentence-transformers input module around an `LLM2Comp`. Every LLM2Comp directory
written by `LLM2Comp.save_pretrained` also carries a ``modules.json`` naming this class, so
``SentenceTransformer(directory, trust_remote_code=True)`` loads it and its ``encode`` gives the same embeddings
as `LLM2Comp.encode` (prompts become the instruction, kept out of mean pooling). `sentence_transformer` wraps a
loaded encoder.

sentence-transformers losses computed by `llm2comp_kernels.contrastive_loss`.

`FusedMultipleNegativesRankingLoss` is a drop-in for
``sentence_transformers.losses.MultipleNegativesRankingLoss``: same constructor, same inputs
((anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples, no labels),
same loss value and gradients. The difference is where the loss runs: on CUDA tensors the fused
kernel scores the anchors against all candidates without materialising the `[B, N]` similarity
matrix (nor its gradient), which is what limits the batch size of the plain loss at large N.

Only the configurations the kernel computes are accepted, and anything else raises a ValueError:
similarity ``cos_sim`` or ``dot_score``; directions ``("query_to_doc",)`` (the default: InfoNCE
over in-batch and hard negatives) or ``("query_to_doc", "doc_to_query")`` with
``partition_mode="per_direction"`` (the symmetric loss, also available as
`FusedMultipleNegativesSymmetricRankingLoss`). Hardness weighting is not supported (use theirs).

Example::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from llm2comp.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss

    model = SentenceTransformer(...)
    loss = FusedMultipleNegativesRankingLoss(model, scale=20.0)
    SentenceTransformerTrainer(model=model, train_dataset=dataset, loss=loss).train()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.input_module import InputModule
    from sentence_transformers.util import cos_sim, dot_score
except ImportError as exc:
    raise ImportError(
        "llm2comp.integrations.sentence_transformers needs sentence-transformers, which is not installed: "
        "pip install sentence-transformers (or pip install 'llm2comp[eval]')"
    ) from exc

from llm2comp_kernels.nn import ContrastiveLoss

from ..model import LLM2Comp

try:  # sentence-transformers >= 6 embeds candidate columns of equal width in one forward pass
    from sentence_transformers.base.losses.merged_forward import embed_columns
except ImportError:  # older versions: one forward per column, the same embeddings
    def embed_columns(model: nn.Module, features_list: Iterable[dict[str, Tensor]]) -> list[Tensor]:
        return [model(features)["sentence_embedding"] for features in features_list]

__all__ = ["LLM2CompModule", "sentence_transformer", "FusedMultipleNegativesRankingLoss",
           "FusedMultipleNegativesSymmetricRankingLoss"]

Similarity = Callable[[Tensor, Tensor], Tensor]

class LLM2CompModule(InputModule):
    """sentence-transformers module: texts -> ``features["sentence_embedding"]`` `[B, D]` from an `LLM2Comp`.

    Saved in the model root, as the LLM2Comp directory itself (config JSON, tokenizer, adapter), with
    ``max_seq_length`` in ``sentence_bert_config.json``.
    """

    save_in_root = True
    config_file_name = "sentence_bert_config.json"
    config_keys = ["max_seq_length"]

    def __init__(self, encoder: LLM2Comp, max_seq_length: int = 512):
        super().__init__()
        self.encoder = encoder
        self.max_seq_length = max_seq_length

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def preprocess(self, inputs: list[str], prompt: str | None = None, **_: Any) -> dict[str, torch.Tensor]:
        """`LLM2Comp.tokenize` with the prompt as instruction."""
        return dict(self.encoder.tokenize(inputs, instruction=prompt or None, max_length=self.max_seq_length))

    def forward(self, features: dict[str, torch.Tensor], **_: Any) -> dict[str, torch.Tensor]:
        names = ("input_ids", "attention_mask", "seq_lens", "memory_start", "text_start")
        features["sentence_embedding"] = self.encoder(**{k: features[k] for k in names})
        return features

    def get_embedding_dimension(self) -> int:
        return self.encoder.hidden_size

    def save(self, output_path: str, *_: Any, **__: Any) -> None:
        self.encoder.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             model_kwargs: dict[str, Any] | None = None, **_: Any) -> LLM2CompModule:
        """The saved module, from a local directory or a hub repo (at `revision`, with `token`...); `model_kwargs`
        (``dtype``/``torch_dtype``...) go to `LLM2Comp.from_pretrained`."""
        hub = {"token": token, "revision": revision, "local_files_only": local_files_only}
        kwargs = {**{k: v for k, v in hub.items() if v}, **({"cache_dir": cache_folder} if cache_folder else {}),
                  **(model_kwargs or {})}
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        config = cls.load_config(model_name_or_path, subfolder=subfolder, cache_folder=cache_folder, **hub)
        return cls(LLM2Comp.from_pretrained(str(Path(model_name_or_path) / subfolder), **kwargs), **config)


def sentence_transformer(encoder: LLM2Comp, max_seq_length: int = 512):
    """A `SentenceTransformer` running `encoder` (shares its weights), with its prompts and truncate_dim."""
    return SentenceTransformer(modules=[LLM2CompModule(encoder, max_seq_length)], device=str(encoder.device),
                               prompts=encoder.prompts, default_prompt_name=encoder.default_prompt_name,
                               truncate_dim=encoder.truncate_dim)


_FORWARD = ("query_to_doc",)
_SYMMETRIC = ("query_to_doc", "doc_to_query")

_CITATION_INFONCE = """
@article{oord2018cpc,
  title   = {Representation Learning with Contrastive Predictive Coding},
  author  = {van den Oord, Aaron and Li, Yazhe and Vinyals, Oriol},
  journal = {arXiv preprint arXiv:1807.03748},
  year    = {2018}
}
"""
_CITATION_SYMMETRIC = """
@article{guenther2023jina2,
  title   = {Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
  author  = {G{\\"u}nther, Michael and Ong, Jackmin and Mohr, Isabelle and Abdessalem, Alaeddine and Abel, Tanguy
             and Akram, Mohammad Kalim and Guzman, Susana and Mastrapas, Georgios and Sturua, Saba and Wang, Bo
             and Werk, Maximilian and Wang, Nan and Xiao, Han},
  journal = {arXiv preprint arXiv:2310.19923},
  year    = {2023}
}
"""


class FusedMultipleNegativesRankingLoss(nn.Module):
    """``MultipleNegativesRankingLoss`` (InfoNCE with in-batch and hard negatives) on the fused kernel."""

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: Similarity = cos_sim,
                 gather_across_devices: bool = False, directions: tuple[str, ...] = _FORWARD,
                 partition_mode: str = "joint", hardness_mode: str | None = None, hardness_strength: float = 0.0,
                 *, backend: str = "auto") -> None:
        """InfoNCE over in-batch and hard negatives, with the semantics of sentence-transformers'
        ``MultipleNegativesRankingLoss``.

        Anchor i is scored against every candidate of the batch (all positives, then all hard
        negatives of every column); its positive is the target. With the symmetric directions, each
        positive i is also scored against every anchor (hard negatives do not take part in this
        direction) with anchor i as target, and the two cross-entropies are averaged per sample.
        The loss is the mean over the anchors.

        Args:
            model: the SentenceTransformer being trained.
            scale: > 0, multiplies the similarities; ``scale = 1 / temperature`` (20 is 0.05).
            similarity_fct: ``sentence_transformers.util.cos_sim`` or ``dot_score``.
            gather_across_devices: under torch.distributed, score the local anchors against the
                candidates of every rank (and, symmetric, the local positives against every anchor).
            directions: ``("query_to_doc",)`` or ``("query_to_doc", "doc_to_query")``.
            partition_mode: ``"joint"`` or ``"per_direction"``; the symmetric directions need
                ``"per_direction"`` (one softmax per direction, averaged), the only mode the kernel computes.
            hardness_mode, hardness_strength: only None / 0 (no hardness weighting).
            backend: the `contrastive_loss` backend, ``"auto"`` (fused kernels for CUDA tensors),
                ``"torch"``, ``"triton"`` or ``"cuda"``.
        """
        super().__init__()
        self.model = model
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = scale
        if similarity_fct is not cos_sim and similarity_fct is not dot_score:
            name = getattr(similarity_fct, "__name__", repr(similarity_fct))
            raise ValueError(f"similarity_fct must be sentence_transformers.util.cos_sim or dot_score, the two "
                             f"similarities the fused kernel computes; got {name}")
        self.similarity_fct = similarity_fct
        self.gather_across_devices = gather_across_devices
        self.directions = tuple(directions)
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
        self.partition_mode = partition_mode
        # With one direction the two partition modes are the same loss.
        if self.directions != _FORWARD and (self.directions != _SYMMETRIC or partition_mode != "per_direction"):
            raise ValueError(f"the fused loss computes directions={_FORWARD} or directions={_SYMMETRIC} with "
                             f"partition_mode='per_direction', got directions={self.directions} and "
                             f"partition_mode={partition_mode!r}; use sentence_transformers' "
                             "MultipleNegativesRankingLoss for the others")
        if hardness_mode is not None or hardness_strength != 0:
            raise ValueError(f"the fused loss has no hardness weighting (got hardness_mode={hardness_mode!r}, "
                             f"hardness_strength={hardness_strength!r}); use sentence_transformers' "
                             "MultipleNegativesRankingLoss for it")
        # Holds and validates the kernel options; each direction is one call of it (see below).
        self.contrastive = ContrastiveLoss(temperature=1.0 / scale, normalize=similarity_fct is cos_sim,
                                           backend=backend)

    @property
    def symmetric(self) -> bool:
        return self.directions == _SYMMETRIC

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        """`sentence_features`: the tokenized columns (anchor, positive, negatives...); `labels` is unused."""
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        """`embeddings`: one `[B, D]` tensor per column (anchor, positive, negatives...) -> scalar loss."""
        if len(embeddings) < 2:
            raise ValueError(f"expected at least 2 columns (anchor, positive), got {len(embeddings)}")
        anchors, positives = embeddings[0], embeddings[1]
        batch_size = anchors.shape[0]
        all_anchors, candidates, offset = anchors, embeddings[1:], 0
        if self.gather_across_devices:
            from sentence_transformers.util import all_gather_with_grad

            all_anchors = all_gather_with_grad(anchors)
            candidates = [all_gather_with_grad(c) for c in candidates]
            offset = torch.distributed.get_rank() * batch_size if torch.distributed.is_initialized() else 0
        # Candidate rows: every rank's positives, then each negative column likewise ([W * B * (C - 1), D]);
        # local anchor i's positive is row offset + i.
        targets = torch.arange(offset, offset + batch_size, device=anchors.device)
        loss = self.contrastive(anchors, torch.cat(candidates), targets)
        if self.symmetric:
            # Positive i against every anchor, target anchor i. On one device this equals
            # contrastive_loss(symmetric=True); a second call also covers the gathered anchors.
            loss = 0.5 * (loss + self.contrastive(positives, all_anchors, targets))
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": self.similarity_fct.__name__,
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "backend": self.contrastive.backend,
        }

    @property
    def citation(self) -> str:
        return _CITATION_SYMMETRIC if self.symmetric else _CITATION_INFONCE


class FusedMultipleNegativesSymmetricRankingLoss(FusedMultipleNegativesRankingLoss):
    """``MultipleNegativesSymmetricRankingLoss`` (anchor -> candidates and positive -> anchors) on the fused kernel."""

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: Similarity = cos_sim,
                 gather_across_devices: bool = False, *, backend: str = "auto") -> None:
        """The symmetric loss of sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``:
        `FusedMultipleNegativesRankingLoss` with ``directions=("query_to_doc", "doc_to_query")`` and
        ``partition_mode="per_direction"``. Hard negatives count in the anchor -> candidates direction only.
        """
        super().__init__(model, scale, similarity_fct, gather_across_devices, directions=_SYMMETRIC,
                         partition_mode="per_direction", backend=backend)

