"""End-to-end `encode` throughput: llm2comp (backend auto and torch) vs sentence-transformers.

The peer is sentence-transformers encoding the same base model with mean pooling (its usual recipe
for a decoder). On CPU (`--quick`) the base is the embedded default model (SmolLM2-135M) on 16 Lee
documents: real measurements of the torch path and of auto (on CPU: sdpa attention, the other ops' torch). On a GPU
the bases are random-init models of real shapes (SmolLM2-135M and a Llama-3-8B-like one), which time
exactly like trained weights, on 256 Lee documents, bf16 (each provider makes at least five calls, and the
8B-shaped model's must fit the benchmark's time cap).

Run: ``python -m benchmarks.bench_encode [--quick]``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from llm2comp import LLM2Comp
from llm2comp.data.lee import load_lee

from . import harness
from .models import GPU_SHAPES, bench_bases, sentence_transformer


def run(quick: bool) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    docs = load_lee().documents
    n_texts, max_length, batch_size = (16, 128, 8) if device == "cpu" else (256, 512, 64)
    texts = [docs[i % len(docs)] for i in range(n_texts)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = harness.live_rows()
    with tempfile.TemporaryDirectory() as tmp:
        for name, base in bench_bases(device, Path(tmp), GPU_SHAPES):
            shape = f"{name} n{n_texts} max_len{max_length} bs{batch_size}"
            base_row = {"op": "encode", "mode": "inference", "shape": shape, "dtype": str(dtype).replace("torch.", "")}
            for backend in ("auto", "torch"):
                def ours(backend=backend, base=base):
                    model = LLM2Comp.from_pretrained(str(base), backend=backend, dtype=dtype, device=device).eval()
                    return lambda: model.encode(texts, batch_size=batch_size, max_length=max_length,
                                                show_progress_bar=False), n_texts
                rows.append(_throughput({**base_row, "provider": f"llm2comp_{backend}"}, ours, device))

            def peer(base=base):
                try:
                    st = sentence_transformer(base, device, dtype)
                except ImportError:
                    return harness.not_installed("sentence-transformers")
                st.max_seq_length = max_length
                return lambda: st.encode(texts, batch_size=batch_size, show_progress_bar=False), n_texts
            rows.append(_throughput({**base_row, "provider": "sentence_transformers_mean"}, peer, device))
    harness.add_ratios(rows, "sentence_transformers_mean")
    return rows


def _throughput(row: dict, build, device: str) -> dict:
    return harness.end_to_end_row(row, build, device, 3000 if device == "cpu" else 2000, "texts_per_s")


if __name__ == "__main__":
    harness.main("encode", run)
