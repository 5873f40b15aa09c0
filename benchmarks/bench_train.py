"""Training-step throughput and peak memory of the three stages: llm2comp (backend auto and torch) vs
sentence-transformers.

One row per (base model, stage, provider): one optimizer step (tokenization, forward, backward, AdamW) on a
fixed batch of Lee documents, built exactly as ``llm2comp train`` builds it (`build_stage` + the trainer's
autocast), timed with the harness; ``tokens_per_s`` counts the real (unpadded) tokens the step reads, as each
provider tokenizes them (llm2comp adds its memory tokens), so the ratio to the peer is one of step times. The
peer, for the two contrastive stages, is sentence-transformers over the same base (same weights' dtype) with mean
pooling, the same LoRA adapters (r16/a32 on the same modules) and `MultipleNegativesRankingLoss(scale=1/
temperature)` on the same texts, tokenized in its step too; compression pretraining has no sentence-transformers
counterpart (a status row says so).

On CPU (`--quick` or not) the base is the embedded default model (SmolLM2-135M), batch 4, 64 tokens: real
measurements of the torch path and of auto (on CPU: sdpa attention, the other ops' torch). On a GPU the bases
are random-init models of real shapes (SmolLM2-135M and a Llama-3.2-1B-like one), batch 32, 256 tokens, bf16 autocast.

Run: ``python -m benchmarks.bench_train [--quick]``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from llm2comp.data.lee import lee_background_documents
from llm2comp.model import LORA_TARGETS
from llm2comp.training import load_config, modeling
from llm2comp.training.stages import build_stage
from llm2comp.training.trainer import autocast_for, resolve_precision

from . import harness
from .models import GPU_SHAPES, bench_bases, sentence_transformer

TRAIN_GPU_SHAPES = {
    "smollm2-135m-shape": GPU_SHAPES["smollm2-135m-shape"],
    "llama3.2-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256),
}
STAGES = ("compress", "unsupervised", "supervised")
INSTRUCTION = "Given the first sentence of a news article, retrieve the article: "


def _write_data(root: Path) -> dict[str, Path]:
    """The Lee background corpus as a text file, and supervised rows: first sentence -> rest of the
    document, another document's rest as the hard negative, with an instruction."""
    docs = lee_background_documents()
    text = root / "lee_background.txt"
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    rows = []
    for i, doc in enumerate(docs):
        head, _, rest = doc.partition(". ")
        other = docs[(i + 7) % len(docs)].partition(". ")[2]
        if head and rest and other:
            rows.append(json.dumps({"query": head, "positive": rest, "negatives": [other], "instruction": INSTRUCTION}))
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"compress": text, "unsupervised": text, "supervised": pairs}


def _llm2comp_step(base: Path, stage: str, backend: str, data: Path, out: Path, batch: int, max_length: int,
                   device: torch.device):
    """(step function, real tokens per step) of one llm2comp optimizer step on the first `batch` examples."""
    extra = {"skip_short": True} if stage == "compress" else {}  # a compress-only option
    cfg = load_config(stage, model=str(base), data=str(data), output=str(out), batch_size=batch,
                      max_length=max_length, attention_backend=backend, **extra)
    model = modeling.load_model(cfg)
    modeling.prepare_for_stage(model, cfg)  # the stage's LoRA, memory rows and dropout, as the trainer sets them
    model.to(device).train()
    work = build_stage(cfg, model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    indices = list(range(batch))
    tokens = []

    def step():
        with autocast_for(resolve_precision(cfg, device), device):
            _, n, _ = work.micro_step(indices, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens.append(n)
    step()
    return step, tokens[-1]


def _st_step(base: Path, stage: str, data: Path, batch: int, max_length: int, device: torch.device):
    """(step function, real tokens per step) of the sentence-transformers peer, or a status string."""
    try:
        from peft import LoraConfig, get_peft_model
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        return harness.not_installed("sentence-transformers")
    cfg = load_config(stage, model=str(base), data=str(data), output="-")
    # the checkpoint's dtype, as llm2comp loads it (bf16 on the GPU; LoRA weights in fp32 on both sides)
    model = sentence_transformer(base, str(device), torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.max_seq_length = max_length
    body = model[0]
    present = {name.rsplit(".", 1)[-1] for name, _ in body.model.named_modules()}
    # peft directly: SentenceTransformer.add_adapter goes through transformers, which wants a newer peft
    body.model = get_peft_model(body.model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                       lora_dropout=cfg.lora_dropout,
                                                       target_modules=[t for t in LORA_TARGETS if t in present]))
    model.train()
    loss_fn = MultipleNegativesRankingLoss(model, scale=1.0 / cfg.temperature)
    if stage == "unsupervised":
        texts = lee_background_documents()[:batch]
        columns = [texts, texts]  # SimCSE: the same texts twice, different dropout
    else:
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:batch]]
        columns = [[r["instruction"] + r["query"] for r in rows], [r["positive"] for r in rows],
                   [r["negatives"][0] for r in rows]]
    def features():
        return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in model.tokenize(col).items()}
                for col in columns]
    tokens = sum(int(f["attention_mask"].sum()) for f in features())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)

    def step():
        with autocast_for(resolve_precision(cfg, device), device):
            loss = loss_fn(features(), None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, tokens


def run(quick: bool) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, max_length = (4, 64) if device.type == "cpu" else (32, 256)
    rows = harness.live_rows()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _write_data(root)
        for name, base in bench_bases(device.type, root, TRAIN_GPU_SHAPES):
            for stage in STAGES:
                base_row = {"op": f"train {stage}", "mode": "optimizer step",
                            "shape": f"{name} bs{batch} max_len{max_length}",
                            "dtype": "bf16 autocast" if device.type == "cuda" else "float32"}
                for backend in ("auto", "torch"):
                    rows.append(_measured({**base_row, "provider": f"llm2comp_{backend}"}, device, _llm2comp_step,
                                          base, stage, backend, data[stage], root / "out", batch, max_length, device))
                peer = {**base_row, "provider": "sentence_transformers_mean"}
                if stage == "compress":
                    rows.append({**peer, "status": "no counterpart: compression pretraining is LLM2Comp's own stage"})
                    continue
                rows.append(_measured(peer, device, _st_step, base, stage, data[stage], batch, max_length, device))
    harness.add_ratios(rows, "sentence_transformers_mean")
    return rows


def _measured(row: dict, device: torch.device, make_step, *args) -> dict:
    """`row` with the timing of the step ``make_step(*args)`` builds (see `harness.end_to_end_row`)."""
    return harness.end_to_end_row(row, lambda: make_step(*args), device, 4000 if device.type == "cpu" else 3000,
                                  "tokens_per_s", per_call="tokens_per_step")


if __name__ == "__main__":
    harness.main("train", run)
