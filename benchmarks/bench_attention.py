"""Benchmark `memory_attention` (bidirectional, GQA, right-padded batches) against the usual alternatives.

GPU: B=32, Hq=32, Hkv=8, d=128, bf16, L in {128, 512, 2048} with lengths uniform in [L/4, L], plus a
no-padding batch at the largest L; forward and forward+backward. Providers, each given q/k/v as the
model has them (transposes of `[B, L, H, d]` projections) and charged for whatever reshaping it needs:

- ``ours``: `memory_attention(backend="triton")`.
- ``cuda``: `memory_attention(backend="cuda")`, when the extension has ``memory_attention_fwd``: blocks of 4 warps
  (64 queries); ``cuda_8warps``: the same kernel with blocks of 8 warps (128 queries sharing each K/V tile),
  to choose the default from.
- ``sdpa_mask``: what llm2vec does: kv heads repeated to Hq, `F.scaled_dot_product_attention` with a
  bool key-padding mask broadcast from `[B, 1, 1, L]` (mask construction and repeats timed).
- ``flex``: compiled `flex_attention` with a block mask from the lengths (compiled `create_block_mask`, timed:
  lengths change every batch; uncompiled it costs 5-7 ms of host time per call); GQA without
  repeating.
- ``varlen``: `torch.nn.attention.varlen.varlen_attn` (torch's bundled FlashAttention-2 varlen kernels) after
  unpadding to `[total, H, d]` (unpad and scatter back timed), when this torch has it.
- ``varlen_kernel``: the same kernel alone, given inputs unpadded beforehand (untimed): FlashAttention-2's
  own speed, what the issue's "0.9x FA2 varlen forward, 0.85x backward" goals compare against.
- ``flash``: `flash_attn_varlen_func` through `memory_attention(backend="flash")` (same unpadding).

TFLOP/s counts real tokens only: ``4 * len^2 * d * Hq`` per sequence forward, backward 2.5x forward; ``pct_peak``
is that over the TFLOP/s of a large bf16 matmul measured in the same run (the first row). Forward rows also have
``graph_ms`` / ``graph_tflops``: the time per call replayed from a CUDA graph over copies of the inputs, i.e.
without the host (providers that cannot be captured say why in ``graph_status``); where ``ms`` is near
``host_ms`` and far above ``graph_ms``, the call is bound by its host-side launch, not by its kernel.
The last rows run every sequence at L/2 (50% padding: the issue's "2x SDPA-with-mask" point) for ours, cuda,
sdpa_mask and varlen_kernel; ``vs_no_padding`` (time at full length / time at half) should approach 4 for ours
(a quarter of the attention flops), well above 2: cost tracks the real tokens. SDPA with a mask stays near 1.
Dropout rows (training, forward+backward, ``dropout_p`` = 0.2, at each L of the U[L/4,L] rows and on the same
inputs): ``ours`` (the Triton kernels drawing their masks by Philox) against ``sdpa_mask`` with SDPA's own dropout;
``vs_no_dropout`` is the provider's time without dropout over its time with it (below 1: what dropout costs).
On CPU, ``--quick`` runs a tiny shape under the Triton interpreter to check the harness; its times mean nothing.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from benchmarks import harness
from llm2comp_kernels._backends import cuda_extension_ops, flash_attn_error
from llm2comp_kernels.memory_attention import memory_attention
from llm2comp_kernels.memory_attention.checks import padding_mask

OP = "memory_attention"
DROPOUT_P = 0.2
CPU_NOTE = "CPU --quick harness check under the interpreter: not a timing"


def _inputs(B, Hq, Hkv, L, d, dtype, device, seq_lens, seed=0):
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]` as transposed views of `[B, L, H, d]`, leaves with grads."""
    g = torch.Generator(device=device).manual_seed(seed)
    def proj(h):
        x = torch.randn(B, L, h, d, generator=g, device=device, dtype=dtype)
        return x.requires_grad_().transpose(1, 2)
    return proj(Hq), proj(Hkv), proj(Hkv), seq_lens


def _direct(fn):
    """A provider that runs `fn(q, k, v, seq_lens)` on the padded inputs: (call, tensors to differentiate)."""
    def prepare(q, k, v, seq_lens):
        return (lambda: fn(q, k, v, seq_lens)), (q, k, v)
    return prepare


def _ours(backend, dropout_p=0.0):
    return _direct(lambda q, k, v, seq_lens: memory_attention(q, k, v, seq_lens, dropout_p=dropout_p,
                                                              backend=backend))


def _cuda_warps(block_warps):
    def attention(q, k, v, seq_lens):
        from llm2comp_kernels.memory_attention.cuda import memory_attention_cuda
        return memory_attention_cuda(q, k, v, seq_lens, False, q.shape[-1] ** -0.5, block_warps)
    return _direct(attention)


def _sdpa_mask(q, k, v, seq_lens, dropout_p=0.0):
    B, Hq, L, _ = q.shape
    group = Hq // k.shape[1]
    mask = padding_mask(seq_lens, L)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask, dropout_p=dropout_p)


def _dropout_providers():
    """The dropout rows' providers: ours and its peer, SDPA with a mask and its own dropout."""
    return {"ours": _ours("triton", DROPOUT_P),
            "sdpa_mask": _direct(lambda q, k, v, seq_lens: _sdpa_mask(q, k, v, seq_lens, DROPOUT_P))}


def _flex():
    """Compiled flex_attention with a per-batch block mask (a provider), or None if this torch lacks it."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask_of = torch.compile(create_block_mask)  # as torch advises for a mask made every step

    def fn(q, k, v, seq_lens):
        B, _, L, _ = q.shape
        def real(b, h, q_idx, kv_idx):
            # Padded query rows too, so their blocks are skipped (their output is left undefined).
            return (q_idx < seq_lens[b]) & (kv_idx < seq_lens[b])
        block_mask = block_mask_of(real, B, None, L, L, device=q.device)
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
    return _direct(fn)


def _varlen(kernel_only: bool):
    """torch's varlen_attn (a provider), or None if this torch lacks it. `kernel_only`: unpad before timing."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters
    extra = {"enable_gqa": True} if gqa else {}

    def unpad(q, k, v, seq_lens):
        """q/k/v as `[total, H, d]` (kv heads repeated if varlen_attn has no GQA), cu_seqlens, valid mask."""
        valid = padding_mask(seq_lens, q.shape[2])
        group = 1 if gqa else q.shape[1] // k.shape[1]
        def pack(x, repeat=1):
            return x.transpose(1, 2)[valid].repeat_interleave(repeat, 1)
        return pack(q), pack(k, group), pack(v, group), F.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0)), valid

    def padded(q, k, v, seq_lens):
        B, Hq, L, d = q.shape
        uq, uk, uv, cu, valid = unpad(q, k, v, seq_lens)
        out = varlen_attn(uq, uk, uv, cu, cu, L, L, **extra)
        full = out.new_zeros(B, L, Hq, d)
        full[valid] = out
        return full.transpose(1, 2)

    def prepare_kernel_only(q, k, v, seq_lens):
        L = q.shape[2]
        with torch.no_grad():
            uq, uk, uv, cu, _ = unpad(q, k, v, seq_lens)
        uq, uk, uv = (x.requires_grad_() for x in (uq, uk, uv))
        return (lambda: varlen_attn(uq, uk, uv, cu, cu, L, L, **extra)), (uq, uk, uv)

    return prepare_kernel_only if kernel_only else _direct(padded)


def _providers(device):
    """name -> provider (``prepare(q, k, v, seq_lens) -> (call, tensors to differentiate)``) or a reason string
    it cannot run here."""
    cpu = device.type != "cuda"
    flex, varlen, varlen_kernel = (None, None, None) if cpu else (_flex(), _varlen(False), _varlen(True))
    missing_varlen = "skipped: needs CUDA" if cpu else "not installed (torch.nn.attention.varlen)"
    has_cuda = "memory_attention_fwd" in cuda_extension_ops() and not cpu
    missing_cuda = "not installed (llm2comp_kernels._C memory_attention_fwd)"
    return {
        "ours": _ours("triton"),
        "cuda": _ours("cuda") if has_cuda else missing_cuda,
        "cuda_8warps": _cuda_warps(8) if has_cuda else missing_cuda,
        "sdpa_mask": _direct(_sdpa_mask),
        "flex": flex or ("skipped: needs CUDA" if cpu else "not installed (torch flex_attention)"),
        "varlen": varlen or missing_varlen,
        "varlen_kernel": varlen_kernel or missing_varlen,
        "flash": _ours("flash") if flash_attn_error() is None and not cpu else "not installed (flash_attn)",
    }


def _flops(seq_lens, Hq, d, mode):
    fwd = 4 * d * Hq * float((seq_lens.double() ** 2).sum())
    return fwd if mode == "forward" else 3.5 * fwd


def _measure(prepare, inputs, mode, device, graph_inputs=()):
    """`harness.measure` of a forward or forward+backward step; forward on CUDA also `harness.graph_ms` over
    `inputs` and `graph_inputs` (copies of the inputs, so the graph's calls do not hit L2)."""
    harness.check_deadline()
    call, leaves = prepare(*inputs)
    if mode == "forward":
        result = harness.measure(harness.forward_step(call), device)
        if device.type == "cuda":
            result.update(harness.graph_ms([harness.forward_step(prepare(*x)[0]) for x in (inputs, *graph_inputs)]))
        return result
    grad = torch.randn_like(call())
    def step():
        torch.autograd.grad(call(), leaves, grad)
    return harness.measure(step, device)


def _rows_for(shape_name, inputs, providers, device, modes, extra=None):
    q, k, v, seq_lens = inputs
    B, Hq, L, d = q.shape
    # Input copies for the graph timing of forward rows: together more than twice an H100's or H200's L2.
    copies = -(-(256 << 20) // (B * L * (Hq + 2 * k.shape[1]) * d * q.element_size())) if device.type == "cuda" else 1
    graph_inputs = [_inputs(B, Hq, k.shape[1], L, d, q.dtype, device, seq_lens, seed=i) for i in range(1, copies)]
    rows = []
    for mode in modes:
        for name, fn in providers.items():
            row = {"op": OP, "mode": mode, "shape": shape_name, "dtype": str(q.dtype).replace("torch.", ""),
                   "provider": name, **(extra or {})}
            if isinstance(fn, str):
                rows.append({**row, "status": fn})
                continue
            try:
                m = _measure(fn, inputs, mode, device, graph_inputs)
            except Exception as exc:  # a peer failing on this shape is a result, not a crash
                rows.append(harness.failed(row, exc))
                continue
            row.update(m)
            if device.type == "cuda":
                row["tflops"] = _flops(seq_lens, q.shape[1], q.shape[3], mode) / (m["ms"] * 1e-3) / 1e12
                if "graph_ms" in m:
                    row["graph_tflops"] = _flops(seq_lens, q.shape[1], q.shape[3], mode) / (m["graph_ms"] * 1e-3) / 1e12
                if name == "ours":  # what the autotuner chose for this shape (BLOCK_M/BLOCK_N/warps/stages)
                    from llm2comp_kernels.memory_attention.triton import last_tuned_configs
                    kernels = ("fwd",) if mode == "forward" else ("fwd", "dq", "dkdv")
                    chosen = last_tuned_configs()
                    row["configs"] = {k: chosen[k] for k in kernels if k in chosen}
            else:
                row["status"] = CPU_NOTE
            rows.append(row)
    return rows


def run(quick: bool) -> list[dict]:
    device = harness.kernel_device("bench_attention", quick)
    peak = harness.matmul_peak_row(OP, device, quick)  # first: before a deadline can cut it
    B, Hq, Hkv, d = (32, 32, 8, 128) if not quick else (2, 4, 2, 16)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = (128, 512, 2048) if not quick else (32,)
    providers = _providers(device)
    modes = ("forward", "forward+backward")
    g = torch.Generator().manual_seed(0)
    rows = harness.live_rows()
    rows.append(peak)
    for L in lengths:
        seq_lens = torch.randint(L // 4, L + 1, (B,), generator=g, dtype=torch.int32).to(device)
        shape = f"B{B} Hq{Hq}/Hkv{Hkv} d{d} L{L} lens U[L/4,L]"
        inputs = _inputs(B, Hq, Hkv, L, d, dtype, device, seq_lens)
        plain_rows = _rows_for(shape, inputs, providers, device, modes)
        dropout_rows = _rows_for(f"{shape} dropout {DROPOUT_P}", inputs, _dropout_providers(), device,
                                 ("forward+backward",), extra={"dropout_p": DROPOUT_P})
        for row in dropout_rows:
            base = next(r for r in plain_rows if r["provider"] == row["provider"] and r["mode"] == row["mode"])
            if "ms" in row and "ms" in base:
                row["vs_no_dropout"] = base["ms"] / row["ms"]
        rows += plain_rows + dropout_rows
    L = lengths[-1]
    full = torch.full((B,), L, dtype=torch.int32, device=device)
    rows += _rows_for(f"B{B} Hq{Hq}/Hkv{Hkv} d{d} L{L} no padding", _inputs(B, Hq, Hkv, L, d, dtype, device, full),
                      providers, device, modes)
    # At 50% padding (the issue's "2x SDPA-with-mask" point), with the peers that goal and FA2's name; ours also
    # against its no-padding row above: half the tokens per row is a quarter of the flops.
    half = torch.full((B,), L // 2, dtype=torch.int32, device=device)
    half_providers = {name: providers[name] for name in ("ours", "cuda", "cuda_8warps", "sdpa_mask", "varlen_kernel")}
    half_rows = _rows_for(f"B{B} Hq{Hq}/Hkv{Hkv} d{d} L{L} 50% padding",
                          _inputs(B, Hq, Hkv, L, d, dtype, device, half), half_providers, device, modes)
    for row in half_rows:
        base = next(r for r in rows
                    if r["provider"] == row["provider"] and r["mode"] == row["mode"] and "no padding" in r["shape"])
        if "ms" in row and "ms" in base:
            row["vs_no_padding"] = base["ms"] / row["ms"]
    rows += half_rows
    harness.add_pct_peak(rows, peak)
    if device.type == "cuda":
        harness.add_ratios(rows, "sdpa_mask")
        harness.add_ratios(rows, "varlen_kernel")
        harness.add_ratios(rows, "flash")
    return rows


if __name__ == "__main__":
    harness.main("attention", run)
