"""Benchmark `contrastive_loss` (InfoNCE over in-batch negatives) against eager PyTorch and Inf-CL.

GPU: B in {1k, 8k, 32k} queries, N = B docs, D in {1024, 4096}, bf16, cosine similarity, temperature 0.05,
labels ``arange(B)``, mean reduction, asymmetric: the configuration Inf-CL computes. Forward (under no_grad: the
loss alone, as in evaluation) and forward+backward (the training step), median ms and peak memory above the
inputs.
Providers:

- ``triton`` / ``cuda``: `contrastive_loss(backend=...)`, tiled, the `[B, N]` logits never stored (the cuda row
  only when the extension has ``contrastive_loss_fwd``).
- ``torch``: `contrastive_loss(backend="torch")`, query chunks checkpointed (recomputed in backward).
- ``eager``: the torch reference (materialises fp32 `[B, N]` logits; an out-of-memory is a status row).
- ``compiled``: `torch.compile(dynamic=True)` of the reference (one compilation for every shape).
- ``inf_cl``: Inf-CL's ``cal_inf_loss(q, k, labels, scale)``: it computes the mean cross-entropy of
  ``scale * q @ k.T`` with targets ``labels``; given L2-normalised q, k (normalisation inside the timed step,
  as ours) and ``scale = 1 / temperature`` that is the same loss.

Each row also has ``loss``, the value it computed, so rows can be checked to agree: positives have cosine ~0.15
with their query (`POSITIVE_WEIGHT`), a loss of a few nats as early in training, not the near-zero loss of
well separated positives, whose value is a difference of two numbers near 14 and keeps few digits. Ours and Inf-CL
return the loss in fp32: on these inputs both matched the float64 reference to the rounding of their output
(Inf-CL's kernels run on CPU under the interpreter, B=128/256, D=512/256).
Ratios: ``vs_inf_cl`` and ``vs_eager`` are the peer's time over the row's. ``tflops`` counts the loss's three
products (logits ``q @ d.T``, ``dS @ d`` and ``dS.T @ q``: ``3 * 2 B N D``; the first alone for forward rows),
not what a provider recomputes; ``pct_peak`` is that over a large bf16 matmul measured in the same run (the
first row).

CPU ``--quick`` proves the harness on a tiny shape (Triton under the interpreter): its times mean nothing. It also
measures real CPU memory at B=N=MEMORY_SHAPE[0], D=MEMORY_SHAPE[1], fp32 (the eager logits alone are 1 GiB): for the
torch backend and the eager full-matrix formulation, each in its own subprocess, the peak resident memory of one
fwd+bwd above the resident memory just before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import harness
from llm2comp_kernels._backends import why_not
from llm2comp_kernels.contrastive_loss import contrastive_loss
from llm2comp_kernels.contrastive_loss.reference import contrastive_loss_reference
from llm2comp_kernels.testing import make_contrastive_inputs

OP = "contrastive_loss"
CPU_NOTE = "CPU --quick harness check under the interpreter: not a timing"
TEMPERATURE = 0.05
GPU_SHAPES = [(B, D) for B in (1024, 8192, 32768) for D in (1024, 4096)]
QUICK_SHAPES = [(40, 32)]
MEMORY_SHAPE = (16384, 64)  # B (= N), D of the CPU memory measurement
POSITIVE_WEIGHT = 0.15


def _ours(backend):
    def fn(q, d, labels):
        return contrastive_loss(q, d, labels=labels, temperature=TEMPERATURE, backend=backend)
    return fn


def _eager(q, d, labels):
    return contrastive_loss_reference(q, d, labels, TEMPERATURE, True, False, "mean")


def _inf_cl(device):
    """Inf-CL configured to our loss, or a status string when it cannot run here."""
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return harness.not_installed("inf-cl")
    if device.type != "cuda":
        return "skipped: Inf-CL's kernels need CUDA"
    scale = torch.tensor(1.0 / TEMPERATURE, device=device)

    def fn(q, d, labels):
        return cal_inf_loss(F.normalize(q, dim=-1), F.normalize(d, dim=-1), labels=labels, scale=scale)
    return fn


def _providers(device, quick) -> dict:
    providers = {"triton": _ours("triton"), "cuda": _ours("cuda"), "torch": _ours("torch"), "eager": _eager,
                 # Inductor on the CPU runner would spend the --quick budget compiling and proves nothing there.
                 "compiled": "skipped on CPU --quick" if quick else torch.compile(_eager, dynamic=True),
                 "inf_cl": _inf_cl(device)}
    reason = why_not("cuda", device, torch.bfloat16, "contrastive_loss_fwd")
    if reason is not None:
        providers["cuda"] = f"skipped: {reason}"
    return providers


def _bench_shape(B, D, dtype, device, quick, mode) -> list[dict]:
    """Rows of every provider at one shape: `mode` "fwd" (the loss alone, under no_grad) or "fwd+bwd"."""
    q, d = make_contrastive_inputs(B, B, D, dtype=dtype, device=device, positive_weight=POSITIVE_WEIGHT,
                                   draw_on_device=True)
    labels = torch.arange(B, device=device)
    rows = []
    for name, fn in _providers(device, quick).items():
        row = {"op": OP, "mode": mode, "shape": f"B={B} N={B} D={D}", "dtype": str(dtype).split(".")[-1],
               "provider": name}
        if isinstance(fn, str):
            rows.append({**row, "status": fn})
            continue
        rows.append(_measured(row, fn, q, d, labels, device, quick))
    return rows


def _measured(row, fn, q, d, labels, device, quick) -> dict:
    """`row` with the loss, time and memory of `fn` (forward under no_grad, or forward+backward), its TFLOP/s
    (forward: the logits product; forward+backward: three products), or its failure."""
    make_step = harness.forward_step if row["mode"] == "fwd" else harness.fwd_bwd_step
    step = make_step(fn, q, d, labels)
    try:
        harness.check_deadline()  # before the first call, which compiles and autotunes
        row["loss"] = step().item()
        row.update(harness.measure(step, device))
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as exc:  # a peer failing is a result, not a crash
        row = harness.failed(row, exc)
    step.release()  # the next provider starts without these gradients
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "ms" in row and device.type == "cuda":
        B, D = q.shape
        products = 1 if row["mode"] == "fwd" else 3
        row["tflops"] = products * 2 * B * d.shape[0] * D / (row["ms"] * 1e-3) / 1e12
    if quick and "ms" in row:
        row["status"] = CPU_NOTE
    return row


def memory_child(provider: str) -> float:
    """Peak RSS increase (MiB) of one CPU fwd+bwd of `provider` at MEMORY_SHAPE (run in a subprocess)."""
    torch.set_num_threads(2)
    B, D = MEMORY_SHAPE
    q, d = make_contrastive_inputs(B, B, D)
    fn = {"torch": _ours("torch"), "eager": _eager}[provider]
    return harness.rss_peak_increase_mib(harness.fwd_bwd_step(fn, q, d, torch.arange(B)))


def run(quick: bool) -> list[dict]:
    device = harness.kernel_device("bench_contrastive_loss", quick)
    peak = harness.matmul_peak_row(OP, device, quick)  # first: before a deadline can cut it
    shapes = QUICK_SHAPES if quick else GPU_SHAPES
    rows = harness.live_rows()
    rows.append(peak)
    for mode in ("fwd+bwd", "fwd"):  # training's rows first: a deadline cuts the forward-only ones
        for B, D in shapes:
            rows += _bench_shape(B, D, torch.bfloat16, device, quick, mode)
    if quick and device.type != "cuda":
        B, D = MEMORY_SHAPE
        base = {"op": OP, "mode": "fwd+bwd memory", "shape": f"B={B} N={B} D={D}", "dtype": "float32"}
        rows += harness.cpu_memory_rows("benchmarks.bench_contrastive_loss", base, ("torch", "eager"))
        harness.add_ratios(rows, "eager", key="peak_mem_mib")
    harness.add_pct_peak(rows, peak)
    harness.add_ratios(rows, "inf_cl")
    harness.add_ratios(rows, "eager")
    return rows


if __name__ == "__main__":
    harness.main(OP, run)
