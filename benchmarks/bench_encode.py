"""End-to-end `encode` throughput: llm2comp (backend auto and torch) vs sentence-transformers.

The peer is sentence-transformers encoding the same base model with mean pooling (its usual recipe
for a decoder). On CPU (`--quick`) the base is the embedded default model (SmolLM2-135M) on 16 Lee
documents: real measurements of the torch paths, where auto and torch are the same code. On a GPU
the bases are random-init models of real shapes (SmolLM2-135M and a Llama-3-8B-like one), which time
exactly like trained weights, on 1024 Lee documents, bf16.

Run: ``python -m benchmarks.bench_encode [--quick]``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from llm2comp import LLM2Comp
from llm2comp.data.lee import load_lee

from . import harness

GPU_SHAPES = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152),
    "llama3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256),
}


def _random_base(name: str, root: Path) -> Path:
    """A random-init Llama of the named shape with a Lee-trained tokenizer, saved to `root/name`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import train_tokenizer

    tokenizer = train_tokenizer(add_bos=True)
    config = LlamaConfig(**GPU_SHAPES[name], max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
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


def _sentence_transformer(base: Path, device: str, dtype: torch.dtype):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    body = Transformer(str(base), model_kwargs={"dtype": dtype})
    if body.tokenizer.pad_token is None:
        body.tokenizer.pad_token = body.tokenizer.eos_token
    return SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), "mean")], device=device)


def run(quick: bool) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    docs = load_lee().documents
    n_texts, max_length, batch_size = (16, 128, 8) if device == "cpu" else (1024, 512, 64)
    texts = [docs[i % len(docs)] for i in range(n_texts)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bases = ({"smollm2-135m": _plain_default_base(Path(tmp))} if device == "cpu"
                 else {name: _random_base(name, Path(tmp)) for name in GPU_SHAPES})
        for name, base in bases.items():
            shape = f"{name} n{n_texts} max_len{max_length} bs{batch_size}"
            base_row = {"op": "encode", "mode": "inference", "shape": shape, "dtype": str(dtype).replace("torch.", "")}
            for backend in ("auto", "torch"):
                model = LLM2Comp.from_pretrained(str(base), backend=backend, dtype=dtype, device=device).eval()
                fn = lambda m=model: m.encode(texts, batch_size=batch_size, max_length=max_length,
                                              show_progress_bar=False)
                rows.append({**base_row, "provider": f"llm2comp_{backend}", **_throughput(fn, device, n_texts)})
                del model
            try:
                st = _sentence_transformer(base, device, dtype)
            except ImportError:
                rows.append(harness.not_installed({**base_row, "provider": "sentence_transformers_mean"},
                                                  "sentence-transformers"))
                continue
            st.max_seq_length = max_length
            fn = lambda m=st: m.encode(texts, batch_size=batch_size, show_progress_bar=False)
            rows.append({**base_row, "provider": "sentence_transformers_mean", **_throughput(fn, device, n_texts)})
    harness.add_ratios(rows, "sentence_transformers_mean")
    return rows


def _throughput(fn, device: str, n_texts: int) -> dict:
    result = harness.measure(fn, device, warmup_ms=1, rep_ms=3000 if device == "cpu" else 2000)
    return {**result, "texts_per_s": n_texts / (result["ms"] / 1e3)}


if __name__ == "__main__":
    harness.main("encode", run)
