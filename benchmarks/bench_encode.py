"""End-to-end `encode` throughput: llm2comp (backend auto and torch; on CPU also its ONNX export on onnxruntime) vs
sentence-transformers.

The peer is sentence-transformers encoding the same base model with mean pooling (its usual recipe
for a decoder). On CPU (`--quick`) the base is the embedded default model (SmolLM2-135M) on 16 Lee
documents: real measurements of the torch path, of auto (on CPU: sdpa attention, the other ops' torch) and of
`llm2comp.export.onnx.export_onnx` run by `OnnxEncoder` (onnxruntime's CPU provider). On a GPU
the bases are random-init models of real shapes (SmolLM2-135M and a Llama-3-8B-like one), which time
exactly like trained weights, on 256 Lee documents, bf16 (each provider makes at least five calls, and the
8B-shaped model's must fit the benchmark's time cap).

Run: ``python -m benchmarks.bench_encode [--quick]``.
"""

from __future__ import annotations

import importlib
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
            if device == "cpu":
                def onnx(base=base, directory=Path(tmp) / f"{name}-onnx"):
                    return _onnx_encode(base, directory, texts, batch_size, max_length)
                rows.append(_throughput({**base_row, "provider": "llm2comp_onnx"}, onnx, device))

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


def _onnx_encode(base: Path, directory: Path, texts: list[str], batch_size: int, max_length: int):
    """(encode call, text count) of a new LLM2Comp of `base` exported to `directory` and run by `OnnxEncoder`, or
    the status of a missing package."""
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(package)
        except ImportError:
            return harness.not_installed(package)
    from llm2comp.export.onnx import export_onnx
    from llm2comp.export.onnx_runtime import OnnxEncoder

    export_onnx(LLM2Comp.from_pretrained(str(base)), directory)
    encoder = OnnxEncoder(directory)
    return lambda: encoder.encode(texts, batch_size=batch_size, max_length=max_length,
                                  show_progress_bar=False), len(texts)


def _throughput(row: dict, build, device: str) -> dict:
    return harness.end_to_end_row(row, build, device, 3000 if device == "cpu" else 2000, "texts_per_s")


if __name__ == "__main__":
    harness.main("encode", run)
