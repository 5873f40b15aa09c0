"""Benchmark `span_mean_pool` (LLM2Comp pooling: the mean of the memory-token span) against eager PyTorch.

GPU: B=512 rows, L=512, span 8 and 16 (memory tokens at varied offsets), D=4096, bf16; forward and
forward+backward. Providers: ``triton`` and ``cuda`` (`span_mean_pool(backend=...)`, the cuda row only if the
extension is built), ``eager`` (the torch reference: `[B, L]` weights contracted with hidden) and ``compiled``
(`torch.compile` of that reference). Each row has median ms, peak memory above the inputs, ``gbps`` = the
bytes the op must move / time, and ``pct_copy`` = gbps as a percentage of a device-to-device copy
(`Tensor.copy_` of 1 GiB) measured in the same run. Bytes that must move: forward reads the span and writes
`[B, D]`; the backward reads `[B, D]` and writes the whole `[B, L, D]` gradient (zeros outside the span).
Forward rows also have ``graph_ms`` / ``graph_gbps`` / ``graph_pct_copy``: the kernels' own time, replayed from a
CUDA graph without the host (a call moves 34-67 MiB, microseconds of work: per call the host can be the bound).

CPU ``--quick`` proves the harness on a tiny shape (Triton under the interpreter): its times mean nothing.
"""

from __future__ import annotations

import torch

from benchmarks import harness
from llm2comp_kernels._backends import why_not
from llm2comp_kernels.span_mean_pool import span_mean_pool
from llm2comp_kernels.span_mean_pool.reference import span_mean_pool_reference
from llm2comp_kernels.testing import make_pool_inputs

OP = "span_mean_pool"
GRAPH_COPIES = 8
CPU_NOTE = "CPU --quick harness check under the interpreter: not a timing"


def _providers(device) -> dict:
    def ours(backend):
        return lambda h, s, n: span_mean_pool(h, s, n, backend=backend)
    providers = {"triton": ours("triton"), "cuda": ours("cuda"), "eager": span_mean_pool_reference,
                 "compiled": torch.compile(span_mean_pool_reference)}
    reason = why_not("cuda", device, torch.bfloat16, "span_mean_pool_fwd")
    if reason is not None:
        providers["cuda"] = f"skipped: {reason}"
    return providers


def _copy_gbps(device, quick: bool) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a 1 GiB buffer (1 MiB with --quick)."""
    numel = (2**20 if quick else 2**30) // 2
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = harness.measure(lambda: dst.copy_(src), device)["ms"]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _bytes(B, L, D, span, elem, mode) -> int:
    fwd = B * span * D * elem + B * D * elem
    return fwd if mode == "fwd" else fwd + B * D * elem + B * L * D * elem


def _bench_shape(B, L, D, span, dtype, device, copy_gbps, quick) -> list[dict]:
    hidden, start, length = make_pool_inputs(B, L, D, dtype=dtype, device=device, span=span, requires_grad=False,
                                             draw_on_device=True)
    grad = torch.randn(B, D, device=device, dtype=dtype)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for name, fn in _providers(device).items():
            row = {"op": OP, "mode": mode, "shape": f"B={B} L={L} D={D} span={span}",
                   "dtype": str(dtype).split(".")[-1], "provider": name}
            if isinstance(fn, str):
                rows.append({**row, "status": fn})
                continue
            if mode == "fwd":
                step = harness.forward_step(fn, hidden, start, length)
            else:
                h = hidden.detach().requires_grad_(True)
                step = harness.fwd_bwd_step(lambda h, fn=fn: fn(h, start, length), h, grad_output=grad)
            try:
                row.update(harness.measure(step, device))  # its deadline check comes before any call
                moved = _bytes(B, L, D, span, hidden.element_size(), mode)
                row["gbps"] = moved / (row["ms"] * 1e-3) / 1e9
                row["pct_copy"] = 100 * row["gbps"] / copy_gbps
                if mode == "fwd" and device.type == "cuda":
                    row.update(_graph_row(fn, hidden, start, length, span, moved, copy_gbps))
            except Exception as exc:  # a provider failing (e.g. torch.compile without a compiler) is a result
                row = harness.failed(row, exc)
            if quick:
                row["status"] = CPU_NOTE
            rows.append(row)
    return rows


def _graph_row(fn, hidden, start, length, span, moved, copy_gbps) -> dict:
    """The forward's kernel time without the host (`harness.graph_ms`) over GRAPH_COPIES spans at shifted offsets
    (each copy reads other rows of `hidden`, 8 x 34 MiB at span 8: more than an H100's or H200's L2), and its
    bandwidth: the figure for the issue's "85% of HBM bandwidth"."""
    L = hidden.shape[1]
    starts = [(start + k * span) % (L - span + 1) for k in range(GRAPH_COPIES)]
    result = harness.graph_ms([harness.forward_step(fn, hidden, s, length) for s in starts])
    if "graph_ms" in result:
        result["graph_gbps"] = moved / (result["graph_ms"] * 1e-3) / 1e9
        result["graph_pct_copy"] = 100 * result["graph_gbps"] / copy_gbps
    return result


def run(quick: bool) -> list[dict]:
    device = harness.kernel_device("bench_span_mean_pool", quick)
    copy_gbps = _copy_gbps(device, quick)
    rows = harness.live_rows()
    rows.append({"op": OP, "mode": "copy", "shape": "1 GiB" if not quick else "1 MiB", "dtype": "bfloat16",
                 "provider": "copy_", "gbps": copy_gbps, **({"status": CPU_NOTE} if quick else {})})
    if quick:
        rows += _bench_shape(4, 24, 64, 8, torch.bfloat16, device, copy_gbps, quick=True)
    else:
        for span in (8, 16):
            rows += _bench_shape(512, 512, 4096, span, torch.bfloat16, device, copy_gbps, quick=False)
    harness.add_ratios(rows, "eager")
    return rows


if __name__ == "__main__":
    harness.main("span_mean_pool", run)
