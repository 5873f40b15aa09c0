"""Benchmark `linear_kl_loss` (KL(teacher || student) through a shared LM head) against the usual alternatives.

GPU: N=8192 rows, H=4096, V in {32000, 128256}, bf16, temperature 1, every row selected; median ms and peak
memory above the inputs of the forward (under no_grad: the loss alone) and of forward+backward (the chunked
providers compute the gradients in forward when grad is on) with the LM head trained (Liger's setting: four
products) and frozen (LLM2Comp's stage 1, where the head is the frozen decoder's: three products; Liger computes
the weight gradient either way).
Providers:

- ``triton``: `linear_kl_loss(backend="triton")` (cuBLAS GEMMs + one fused softmax/KL/gradient kernel per chunk).
- ``torch``: `linear_kl_loss(backend="torch")`, the row-chunked PyTorch backend.
- ``naive``: full `[N, V]` logits, fp32 log_softmax, `F.kl_div(log_target=True)`, autograd (OOM -> status row).
- ``naive_compiled``: `torch.compile` of the naive function.
- ``liger``: `LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0, weight_soft_loss=1)`, given the same weight as
  student and teacher head. In Liger's generalized JSD, beta=0 is ``F.kl_div(log p_s, log p_t, log_target=True)``,
  i.e. KL(teacher || student), summed over V and divided by the number of non-ignored labels (all rows here):
  the same objective. Its gradient goes to the student input and student weight only.

Each row also has ``loss_rel_err``: its loss against the torch backend's (a check that all compute the same thing),
and ``tflops``: the four products every provider must do (student and teacher logits, ``d_student = g @ W``,
``dW = g.T @ h``: ``4 * 2 N H V``; three with a frozen head, two in forward rows) over its time; ``pct_peak`` is
that over a large bf16 matmul measured in the same run (the first row), so no provider can exceed about 100.

CPU ``--quick`` proves the harness on a tiny shape (Triton under the interpreter): its times mean nothing. It also
measures real CPU memory at N=2048, V=32000, H=64 fp32 (naive logits 250 MiB per tensor): for the torch backend
and the naive formulation, each in its own subprocess, peak resident memory during one fwd+bwd minus the resident
memory just before it (Linux VmHWM / VmRSS of /proc/self/status), so the allocations of torch itself and the
inputs are not counted. The torch backend runs with its default CPU chunk (a 512 MiB working-buffer budget),
recorded in the row.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from benchmarks import harness
from llm2comp_kernels.linear_kl_loss import linear_kl_loss
from llm2comp_kernels.linear_kl_loss.checks import resolve_chunk_size
from llm2comp_kernels.testing import make_linear_kl_inputs, rel_err

OP = "linear_kl_loss"
CPU_NOTE = "CPU --quick harness check under the interpreter: not a timing"
LIGER_NOTE = "LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0, weight_soft_loss=1): KL(teacher||student)"
MEMORY_SHAPE = (2048, 64, 32000)  # N, H, V of the CPU memory measurement


def _ours(backend):
    def fn(student, teacher, weight):
        return linear_kl_loss(student, teacher, weight, backend=backend)
    return fn


def _naive(student, teacher, weight):
    """Full-logits formulation: what one writes without a fused loss."""
    log_ps = torch.log_softmax((student @ weight.T).float(), dim=-1)
    with torch.no_grad():
        log_pt = torch.log_softmax((teacher @ weight.T).float(), dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)  # fp32, as the fused losses


def _liger():
    """Liger's fused linear JSD configured to forward KL, or None if liger-kernel is missing."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0)

    def fn(student, teacher, weight):
        labels = torch.zeros(student.shape[0], dtype=torch.long, device=student.device)   # none ignored
        return loss(student, weight, teacher, weight, labels)
    return fn


def _providers(device):
    providers = {"triton": _ours("triton"), "torch": _ours("torch"), "naive": _naive,
                 "naive_compiled": torch.compile(_naive)}
    liger = _liger()
    providers["liger"] = liger if liger is not None else harness.not_installed("liger-kernel")
    if liger is not None and device.type != "cuda":
        providers["liger"] = "skipped: Liger's kernels need CUDA"
    return providers


@functools.lru_cache(maxsize=2)  # the shapes' inputs, made once for the three modes (a 128k x 4k head: seconds)
def _inputs(N, H, V, dtype, device):
    return make_linear_kl_inputs(N, H, V, dtype=dtype, device=device, draw_on_device=True)


def _bench_shape(N, H, V, dtype, device, quick, mode, head_trained=True) -> list[dict]:
    """Rows of every provider at one shape: `mode` "fwd" (the loss alone, under no_grad) or "fwd+bwd"."""
    student, teacher, weight = _inputs(N, H, V, dtype, device)
    weight.requires_grad_(head_trained)
    with torch.no_grad():
        expected = linear_kl_loss(student, teacher, weight, backend="torch")
    rows = []
    shape = f"N={N} H={H} V={V}" + ("" if mode == "fwd" else f" head {'trained' if head_trained else 'frozen'}")
    # Products every provider must do: student and teacher logits; backward adds d_student, and dW if trained.
    products = 2 if mode == "fwd" else 4 if head_trained else 3
    for name, fn in _providers(device).items():
        row = {"op": OP, "mode": mode, "shape": shape, "dtype": str(dtype).split(".")[-1], "provider": name}
        if name == "liger":
            row["config"] = LIGER_NOTE
        if name == "liger" and mode == "fwd" and not isinstance(fn, str):
            fn = "no loss-only path: Liger computes its gradients in the forward (under no_grad too)"
        if isinstance(fn, str):
            rows.append({**row, "status": fn})
            continue
        step = (harness.forward_step if mode == "fwd" else harness.fwd_bwd_step)(fn, student, teacher, weight)
        try:
            harness.check_deadline()  # before the first call, which compiles and autotunes
            row["loss_rel_err"] = rel_err(step().detach(), expected)
            row.update(harness.measure(step, device))
            if device.type == "cuda":
                row["tflops"] = products * 2 * N * H * V / (row["ms"] * 1e-3) / 1e12
        except Exception as exc:  # an OOM of the full-logits providers, or a peer failing: a result, not a crash
            row = harness.failed(row, exc)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        step.release()  # the next provider starts without these gradients
        if quick:
            row["status"] = CPU_NOTE
        rows.append(row)
    return rows


def memory_child(provider: str) -> float:
    """Peak RSS increase (MiB) of one CPU fwd+bwd of `provider` at MEMORY_SHAPE (run in a subprocess)."""
    torch.set_num_threads(2)
    student, teacher, weight = make_linear_kl_inputs(*MEMORY_SHAPE)
    fn = {"torch": _ours("torch"), "naive": _naive}[provider]
    return harness.rss_peak_increase_mib(harness.fwd_bwd_step(fn, student, teacher, weight))


def _cpu_memory_rows() -> list[dict]:
    N, H, V = MEMORY_SHAPE
    base = {"op": OP, "mode": "fwd+bwd memory", "shape": f"N={N} H={H} V={V}", "dtype": "float32"}
    rows = harness.cpu_memory_rows("benchmarks.bench_linear_kl_loss", base, ("torch", "naive"))
    rows[0]["chunk_size"] = resolve_chunk_size(None, V, torch.device("cpu"))
    harness.add_ratios(rows, "naive", key="peak_mem_mib")
    return rows


def run(quick: bool) -> list[dict]:
    device = harness.kernel_device("bench_linear_kl_loss", quick)
    peak = harness.matmul_peak_row(OP, device, quick)  # first: before a deadline can cut it
    shapes = [(64, 32, 1000, torch.float32)] if quick else [(8192, 4096, V, torch.bfloat16) for V in (32000, 128256)]
    # The rows a deadline must not cut first: training with the head trainable (the comparison with Liger), then
    # frozen (LLM2Comp's stage 1), then the forward alone.
    rows = harness.live_rows()
    rows.append(peak)
    for mode, trained in (("fwd+bwd", True), ("fwd+bwd", False), ("fwd", False)):
        for N, H, V, dtype in shapes:
            rows += _bench_shape(N, H, V, dtype, device, quick, mode, trained)
    if quick and device.type != "cuda":
        rows += _cpu_memory_rows()
    harness.add_pct_peak(rows, peak)
    harness.add_ratios(rows, "liger")
    return rows


if __name__ == "__main__":
    harness.main(OP, run)
