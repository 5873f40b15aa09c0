"""The ops of llm2comp_kernels._C, with the schemas of csrc/bindings.cpp, on CPU tensors over the emulated
kernels: what lets the cuda backends' Python side (llm2comp_kernels/<op>/cuda.py: layouts, autograd, fake
kernels) run without a GPU. The binding's argument checks are not emulated; its chunk loop for
contrastive_loss is, below (cuBLAS products as torch.mm in fp32).

Each op function takes the emulated library first and `place`, which every tensor a kernel sees goes
through (the tests pass guards there); `register(lib)` defines the ops for CPU tensors with place = identity."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import torch

from . import DTYPE_CODES, call

BINDINGS = Path(__file__).resolve().parents[2] / "csrc" / "bindings.cpp"
LOG2E = 1.0 / math.log(2.0)


def schemas() -> list[str]:
    """The `m.def(...)` schema strings of csrc/bindings.cpp (adjacent C++ literals joined)."""
    text = BINDINGS.read_text()
    return ["".join(re.findall(r'"([^"]*)"', m.group(1))) for m in re.finditer(r'm\.def\(((?:\s*"[^"]*")+)\)', text)]


def _same(x):
    return x


def span_mean_pool_fwd(lib, hidden, start, length, place=_same):
    B, L, D = hidden.shape
    out = place(torch.full((B, D), float("nan"), dtype=hidden.dtype))
    call(lib, "emu_span_mean_pool_fwd", DTYPE_CODES[hidden.dtype], place(hidden), place(start), place(length), out,
         B, L, D)
    return out


def span_mean_pool_bwd(lib, grad_out, start, length, L, place=_same):
    B, D = grad_out.shape
    grad_hidden = place(torch.full((B, L, D), float("nan"), dtype=grad_out.dtype))
    call(lib, "emu_span_mean_pool_bwd", DTYPE_CODES[grad_out.dtype], place(grad_out), place(start), place(length),
         grad_hidden, B, L, D)
    return grad_hidden


def _doc_chunk(lib, requested, queries, N):
    """The binding's doc_chunk(): `requested` (at most N), or sized to the kernels' workspace budget."""
    if requested > 0:
        return min(requested, N)
    itemsize = queries.element_size()
    return lib.emu_contrastive_loss_doc_chunk(len(queries), N, 4 if itemsize == 4 else 4 + itemsize)


def _logit_blocks(queries, docs, chunk):
    """(first doc, fp32 [B, width] raw dot products) per chunk of docs."""
    return [(n0, (queries.float() @ docs[n0:n0 + chunk].float().T).contiguous())
            for n0 in range(0, len(docs), chunk)]


def contrastive_loss_fwd(lib, queries, docs, labels, temperature, symmetric, doc_chunk=0, place=_same):
    B, N = len(queries), len(docs)
    scale_log2 = LOG2E / temperature
    labels = place(labels)
    loss = place(torch.full((B,), float("nan")))
    row_stats = place(torch.full((B, 2), float("nan")))
    col_stats = place(torch.full((N if symmetric else 0, 2), float("nan")))
    for n0, logits in _logit_blocks(queries, docs, _doc_chunk(lib, doc_chunk, queries, N)):
        x = place(logits)
        call(lib, "emu_contrastive_loss_block_stats", x, B, x.shape[1], n0, scale_log2, n0 == 0, row_stats,
             labels, loss)
        if symmetric:
            call(lib, "emu_contrastive_loss_col_stats", x, B, x.shape[1], scale_log2, col_stats[n0:])
    call(lib, "emu_contrastive_loss_finalize", row_stats, col_stats if symmetric else None, labels, loss, B, N)
    return loss, row_stats, col_stats


def contrastive_loss_bwd(lib, grad_loss, queries, docs, labels, row_stats, col_stats, temperature, symmetric,
                         doc_chunk=0, place=_same):
    B, N = len(queries), len(docs)
    scale_log2 = LOG2E / temperature
    labels, grad_loss = place(labels), place(grad_loss)
    w_row = place(grad_loss * 0.5 if symmetric else grad_loss.clone())
    w_col = place(torch.zeros(N).index_put_((labels,), w_row, accumulate=True)) if symmetric else None
    chunk = _doc_chunk(lib, doc_chunk, queries, N)
    dq, dd = torch.zeros(B, queries.shape[1]), torch.empty(N, queries.shape[1])
    for n0, logits in _logit_blocks(queries, docs, chunk):
        x = place(logits)
        # float32: dS overwrites the logits in place, as in the binding.
        ds = x if queries.dtype == torch.float32 else place(torch.full(x.shape, float("nan"), dtype=queries.dtype))
        call(lib, "emu_contrastive_loss_block_dlogits", DTYPE_CODES[queries.dtype], x, ds, B, x.shape[1], n0,
             scale_log2, row_stats, w_row, col_stats if symmetric else None, w_col, labels, grad_loss)
        dq += ds.float() @ docs[n0:n0 + chunk].float() / temperature
        dd[n0:n0 + chunk] = ds.float().T @ queries.float() / temperature
    return dq, dd


def memory_attention_fwd(lib, q, k, v, seq_lens, causal, scale, with_lse=False, block_warps=4, place=_same):
    """(out, lse): lse fp32 [B, Hq, L] if with_lse, else empty. q/k/v keep their strides."""
    B, Hq, L, d = q.shape
    out = place(torch.full((B, Hq, L, d), float("nan"), dtype=q.dtype))
    lse = place(torch.full((B, Hq, L), float("nan"))) if with_lse else torch.empty(0)
    strides = torch.tensor([s for x in (q, k, v) for s in x.stride()[:3]], dtype=torch.int64)
    call(lib, "emu_memory_attention_fwd", DTYPE_CODES[q.dtype], q, k, v, place(seq_lens.long()), out,
         lse if with_lse else None, B, Hq, k.shape[1], L, d, strides, causal, scale, block_warps)
    return out, lse


OPS = (span_mean_pool_fwd, span_mean_pool_bwd, contrastive_loss_fwd, contrastive_loss_bwd, memory_attention_fwd)


def register(lib) -> torch.library.Library:
    """Defines torch.ops.llm2comp.* for CPU tensors over the emulated kernels (the real extension must not be
    loaded). Keep the returned library alive; its `_destroy()` removes the ops again."""
    library = torch.library.Library("llm2comp", "DEF")
    for schema in schemas():
        library.define(schema)
    for op in OPS:
        library.impl(op.__name__, functools.partial(op, lib), "CPU")
    return library
