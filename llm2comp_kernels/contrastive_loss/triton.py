"""Triton backend of `contrastive_loss`: tiled InfoNCE that never materialises the `[B, N]` logits.

Notation: ``s_ij = q_i . d_j / T`` (q, d already normalised when ``normalize=True``), row LSE
``r_i = logsumexp_j s_ij``, column LSE ``c_j = logsumexp_k s_kj``, labels ``l_i``. Per query
``loss_i = r_i - s_{i,l_i}``; symmetric: ``0.5 * (r_i - s_{i,l_i} + c_{l_i} - s_{i,l_i})``.

Forward: one pass over the logit tiles, `_contrastive_row_kernel`, one program per (block of BLOCK_M queries,
split of the docs) looping over the doc tiles of its split (`_splits`: as many splits as it takes to give the
GPU about two programs per SM; one when the query blocks alone suffice; without splits, B=1024 queries in
blocks of 64 would be 16 programs on a 132-SM GPU).

- Rows: online softmax (base 2, fp32) over the doc tiles gives a running max and a sum of exponentials (kept
  apart, see `_ContrastiveLossFn`), and the positive logit ``s_{i,l_i}`` is picked out of the same tiles;
  `_combine` merges the splits' statistics into ``r_i``. Extra memory O(S B) for S splits.
- Columns (symmetric only), from the same tiles: each tile's column max and sum over its BLOCK_M queries go to
  the program's row of a `[query blocks, N]` array, which `_combine` reduces to ``c_j`` for all N docs (all N
  rather than the B labelled ones: the backward needs every doc's). The queries go through in chunks
  (`_query_chunk`) that keep that array near `_DS_WORKSPACE_BYTES`, each chunk's ``c_j`` merged into the
  previous ones'. One pass instead of a second, doc-major one: the symmetric forward costs the tile products
  of one direction, not two.

Backward (recompute): with upstream ``g_i``, ``a_i = g_i`` (``g_i / 2`` if symmetric) and
``G_j = sum_{i: l_i = j} a_i`` (symmetric only, an O(B) scatter in torch),
``dS_ij = a_i exp(s_ij - r_i) + G_j exp(s_ij - c_j) - g_i [j = l_i]`` (the G term only if symmetric),
``dq = dS @ d / T`` and ``dd = dS^T @ q / T``. The docs go through in chunks of C (`_doc_chunk`):

- `_contrastive_dlogits_kernel`, one program per (query block, doc block of the chunk), recomputes its tile of
  logits and writes ``dS`` for the chunk's `[B, C]` block in the inputs' dtype (as a tensor-core operand);
- two cuBLAS products in fp32 (`mm_fp32`) then give ``dd`` of the chunk's docs and add the chunk's share
  into ``dq``. Each gradient product thus runs as one large GEMM, with no read-modify-write of fp32 gradient
  rows per doc tile and no atomics.

The block of ``dS`` is the backward's only working memory beyond O(B + N) statistics and the fp32 gradients:
C is sized so that it stays near `_DS_WORKSPACE_BYTES` whatever B is (the `[B, N]` matrix is never
materialised). Recomputing beats computing gradients in forward here: the forward would need ``r_i`` before
the softmax weights are final (a second pass anyway), and the column terms need ``c_j``, known only after the
column pass.

Normalisation is done once, in torch, in fp32 (`contrastive_loss_triton`), and autograd differentiates it;
the kernels return fp32 gradients so that chain rule runs in fp32. Block sizes are autotuned on a GPU (keyed
on D); under ``TRITON_INTERPRET=1`` or with ``LLM2COMP_TRITON_AUTOTUNE=0`` a fixed small config is used,
with unequal query/doc blocks so the tests cross tile edges that do not line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._autograd import first_derivative_only
from .._backends import triton_autotune, triton_interpret
from .._matmul import mm_fp32
from .._triton_common import dot, dot_upcast
from .reference import reduce_losses

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# (BLOCK_M, BLOCK_N, BLOCK_K) when not autotuning; every tl.dot dim must be >= 16. Every tuned config has the
# same BLOCK_K, so forward and backward sum each logit over D in the same chunk order (the backward's
# exp2(s - max) is then 1 at the max, not 1 +- the rounding of a differently summed logit). The 128x64 and
# 64x128 tiles use 8 warps: with 4 they spill registers on sm_90 (`python .ci/compile_triton.py --only
# contrastive` prints registers and spills per config and kernel).
_FIXED = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}
# Working memory per launch on a GPU: the backward's dS block of a doc chunk (B = N = 8192 in bf16 is one chunk;
# B = 32768 takes chunks of 2048 docs) and the symmetric forward's column statistics of a query chunk (N = 32768:
# all queries at once). Under the interpreter, chunks of 24 rows instead, so the tests cross chunk edges.
_DS_WORKSPACE_BYTES = 128 << 20
_INTERPRET_CHUNK = 24
_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
                                  (64, 64, 64, 4, 4), (64, 256, 64, 8, 3)]]


@triton.jit
def _split_range(total, BLOCK: tl.constexpr):
    """[start, end) of this program's share (split program_id(1) of num_programs(1)) of `total` rows, in whole
    BLOCK tiles: no tile crosses a split, whatever block the autotuner picked. A split may be empty."""
    tiles = tl.cdiv(total, BLOCK)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    return split * tiles // splits * BLOCK, (split + 1) * tiles // splits * BLOCK


@triton.jit
def _logits_tile(Q, Dm, offs_m, offs_n, B, N, D, stride_qb, stride_qd, stride_db, stride_dd, scale_log2,
                 UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``s_ij * log2(e)`` for the `[BLOCK_M, BLOCK_N]` tile (fp32), summed over D in BLOCK_K chunks.
    Rows/columns past B/N read zeros; callers mask them."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    m_in = offs_m < B
    n_in = offs_n < N
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < D
        q = tl.load(Q + offs_m[:, None] * stride_qb + offs_k[None, :] * stride_qd,
                    mask=m_in[:, None] & k_in[None, :], other=0.0)
        d = tl.load(Dm + offs_n[:, None] * stride_db + offs_k[None, :] * stride_dd,
                    mask=n_in[:, None] & k_in[None, :], other=0.0)
        acc += dot(q, tl.trans(d), UPCAST)
    return acc * scale_log2


@triton.jit
def _contrastive_row_kernel(
    Q, Dm, LABELS,  # Q [B, D], Dm [N, D] (any strides), LABELS int64 [B]: this launch's queries, all docs
    ROW_MAX, ROW_SUM, POS,  # fp32 [S, B] views, row stride `stride_part`
    COL_MAX, COL_SUM,  # fp32 [>= cdiv(B, BLOCK_M), N] contiguous (SYMMETRIC only)
    stride_qb, stride_qd, stride_db, stride_dd, stride_part,
    B, N, D, scale_log2,
    SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (i, s): queries of block i against the docs of split s, row statistics into row s of the
    # outputs; if SYMMETRIC also, per doc tile, the column statistics of its BLOCK_M queries into row i of
    # COL_MAX/COL_SUM (each (query block, doc) pair is in exactly one split).
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    m_in = offs_m < B
    label = tl.load(LABELS + offs_m, mask=m_in, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    n_start, n_end = _split_range(N, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        s = _logits_tile(Q, Dm, offs_m, offs_n, B, N, D, stride_qb, stride_qd, stride_db, stride_dd, scale_log2,
                         UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        n_in = offs_n < N
        if SYMMETRIC:
            # The block's first row is a real query, so every column max is finite; columns past N are not
            # stored.
            s_col = tl.where(m_in[:, None], s, float("-inf"))
            col_max = tl.max(s_col, 0)
            col_sum = tl.sum(tl.exp2(s_col - col_max[None, :]), 0)
            tl.store(COL_MAX + pid_m * N + offs_n, col_max, mask=n_in)
            tl.store(COL_SUM + pid_m * N + offs_n, col_sum, mask=n_in)
        s = tl.where(n_in[None, :], s, float("-inf"))
        pos += tl.sum(tl.where(offs_n[None, :] == label[:, None], s, 0.0), 1)
        # The split's first tile starts with a real doc, so m_new is finite from the first step on (an empty
        # split stores max -inf, sum 0: nothing, to `_combine`).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(ROW_MAX + split * stride_part + offs_m, m_i, mask=m_in)
    tl.store(ROW_SUM + split * stride_part + offs_m, l_i, mask=m_in)
    tl.store(POS + split * stride_part + offs_m, pos, mask=m_in)


@triton.jit
def _grad_logits_tile(Q, Dm, LABELS, ROW_MAX, COL_MAX, A, G, COL_W, offs_m, offs_n, B, N, D,
                      stride_qb, stride_qd, stride_db, stride_dd, scale_log2,
                      SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dS_ij`` (fp32, see the module docstring) for one tile, zero outside the B x N range. A and COL_W
    come divided by the row / column sums, so the softmax is ``exp2(s - max) * A``."""
    m_in = offs_m < B
    n_in = offs_n < N
    s = _logits_tile(Q, Dm, offs_m, offs_n, B, N, D, stride_qb, stride_qd, stride_db, stride_dd, scale_log2,
                     UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    row_max = tl.load(ROW_MAX + offs_m, mask=m_in, other=0.0)
    a = tl.load(A + offs_m, mask=m_in, other=0.0)
    g = tl.load(G + offs_m, mask=m_in, other=0.0)
    label = tl.load(LABELS + offs_m, mask=m_in, other=-1)
    ds = a[:, None] * tl.exp2(s - row_max[:, None])
    if SYMMETRIC:
        col_max = tl.load(COL_MAX + offs_n, mask=n_in, other=0.0)
        col_w = tl.load(COL_W + offs_n, mask=n_in, other=0.0)
        ds += col_w[None, :] * tl.exp2(s - col_max[None, :])
    ds -= tl.where(offs_n[None, :] == label[:, None], g[:, None], 0.0)
    # where, not a product: exp2 of padded rows/columns may overflow, and inf * 0 would be NaN.
    return tl.where(m_in[:, None] & n_in[None, :], ds, 0.0)


@triton.jit
def _contrastive_dlogits_kernel(
    Q, Dm, LABELS, ROW_MAX, COL_MAX, A, G, COL_W, DS,  # Q [B, D], Dm [N, D] (any strides), LABELS int64 [B],
    # ROW_MAX/A/G fp32 [B], COL_MAX/COL_W fp32 [N] (symmetric only), DS [B, n_end - n_start] contiguous
    stride_qb, stride_qd, stride_db, stride_dd,
    B, n_start, n_end, D, scale_log2,
    SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (i, j): the dS tile of query block i and doc block j of the chunk [n_start, n_end).
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = _grad_logits_tile(Q, Dm, LABELS, ROW_MAX, COL_MAX, A, G, COL_W, offs_m, offs_n, B, n_end, D,
                           stride_qb, stride_qd, stride_db, stride_dd, scale_log2,
                           SYMMETRIC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    width = n_end - n_start
    tl.store(DS + offs_m[:, None] * width + (offs_n - n_start)[None, :], ds.to(DS.dtype.element_ty),
             mask=(offs_m < B)[:, None] & (offs_n < n_end)[None, :])


# Autotuning runs a kernel once per config: the row kernel's column statistics are put back as they were after
# each trial (a trial with smaller blocks would leave rows that the chosen config does not overwrite).
_row_tuned = triton.autotune(_CONFIGS, key=["D"], restore_value=["COL_MAX", "COL_SUM"])(_contrastive_row_kernel)
_dlogits_tuned = triton.autotune(_CONFIGS, key=["D"])(_contrastive_dlogits_kernel)


def _launch(kernel, tuned, grid, *args, **constexprs) -> None:
    """Run `tuned` (autotuned), or `kernel` with the `_FIXED` blocks, over ``grid(blocks)`` programs, where
    `blocks` maps "BLOCK_M"/"BLOCK_N" to the config's sizes."""
    if triton_autotune():
        tuned[grid](*args, **constexprs)
    else:
        kernel[grid(_FIXED)](*args, **constexprs, **_FIXED)


def _splits(rows: int, rows_key: str, cols: int, cols_key: str, device: torch.device) -> int:
    """How many splits of the side each forward program loops over (`cols`, tiled by `cols_key`) the launch
    uses: on a GPU, enough for about two programs per SM when the `rows` side alone has too few blocks (B=1024
    queries in blocks of 64 are 16 programs: an eighth of a 132-SM GPU); under the interpreter three, so the tests
    cover combining splits (empty ones too)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    return _splits_for(rows, rows_key, cols, cols_key, sms)


def _splits_for(rows: int, rows_key: str, cols: int, cols_key: str, sms: int | None) -> int:
    """`_splits` for a GPU of `sms` SMs (None: the interpreter)."""
    if sms is None:
        return 3
    wanted = triton.cdiv(2 * sms, triton.cdiv(rows, _smallest(rows_key)))  # the most row programs of any config
    return max(1, min(wanted, triton.cdiv(cols, _smallest(cols_key))))


def _smallest(key: str) -> int:
    """The smallest `key` block ("BLOCK_M", "BLOCK_N") a launch of this run may use."""
    return min(c.kwargs[key] for c in _CONFIGS) if triton_autotune() else _FIXED[key]


def _combine(part_max: torch.Tensor, part_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split softmax statistics `[S, R]` (max, sum of exp2(x - max)) -> those of all splits `[R]`."""
    if part_max.shape[0] == 1:
        return part_max[0], part_sum[0]
    overall = part_max.amax(0)
    return overall, (part_sum * torch.exp2(part_max - overall)).sum(0)


def _query_chunk(B: int, N: int) -> int:
    """Queries per launch of the symmetric forward: their column statistics, one fp32 (max, sum) pair per query
    block and doc, stay near `_DS_WORKSPACE_BYTES` (a multiple of 256 queries, at least 256, at most B). Under
    the interpreter `_INTERPRET_CHUNK`, so the tests merge several launches' statistics."""
    if triton_interpret():
        return min(B, _INTERPRET_CHUNK)
    blocks = _DS_WORKSPACE_BYTES // (8 * N)
    return min(B, max(256, blocks * _smallest("BLOCK_M") // 256 * 256))


def _doc_chunk(B: int, N: int, itemsize: int) -> int:
    """Docs per chunk of the backward: its `[B, C]` block of dS (`itemsize` bytes per value) stays near
    `_DS_WORKSPACE_BYTES`, C a multiple of 256 (at least 256: long enough GEMMs) and at most N. Under the
    interpreter `_INTERPRET_CHUNK`, so the tests cover several chunks whose edges fall inside a doc block."""
    if triton_interpret():
        return min(N, _INTERPRET_CHUNK)
    return min(N, max(256, _DS_WORKSPACE_BYTES // (B * itemsize) // 256 * 256))


@dataclass(frozen=True)
class _ContrastiveParams:
    temperature: float
    symmetric: bool
    dtype: torch.dtype  # the dtype the kernels compute in (the caller's inputs')


class _ContrastiveLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, docs, labels, params: _ContrastiveParams):
        # queries/docs may be fp32 (normalised) copies of lower-precision inputs: the kernels read `params.dtype`
        # and the gradients go back in fp32, cast to these tensors' dtypes.
        ctx.input_dtypes = (queries.dtype, docs.dtype)
        q, d = queries.to(params.dtype), docs.to(params.dtype)
        B, D = q.shape
        N = d.shape[0]
        scale_log2 = _LOG2E / params.temperature
        upcast = dot_upcast(params.dtype)
        strides = (*q.stride(), *d.stride())
        # Softmax statistics in base 2: running max and sum of exp2(s - max), kept apart (not folded into one
        # log-sum-exp) so that `max - pos` is exactly 0 when the positive is the largest logit, and the softmax of
        # the backward is exp2(s - max) / sum: a well separated positive keeps the precision of its small
        # loss and of its 1 - p gradient instead of losing it to the rounding of a log-sum-exp of size |s|.
        rows = _query_chunk(B, N) if params.symmetric else B
        splits = _splits(rows, "BLOCK_M", N, "BLOCK_N", q.device)
        part_max = torch.empty(splits, B, device=q.device, dtype=torch.float32)
        part_sum, part_pos = torch.empty_like(part_max), torch.empty_like(part_max)
        col_max = col_sum = None
        for b0 in range(0, B, rows):
            bc = min(rows, B - b0)
            # Column (max, sum) of each query block (symmetric; else unused placeholders). Allocated for the smallest
            # block any config may use and started empty (-inf, 0): a config with larger blocks fills fewer rows,
            # and the others add nothing when merged.
            col_part = torch.empty((2, triton.cdiv(bc, _smallest("BLOCK_M")), N) if params.symmetric else (2, 1, 1),
                                   device=q.device, dtype=torch.float32)
            if params.symmetric:
                col_part[0].fill_(float("-inf"))
                col_part[1].zero_()
            _launch(_contrastive_row_kernel, _row_tuned,
                    lambda blocks, bc=bc: (triton.cdiv(bc, blocks["BLOCK_M"]), splits),
                    q[b0:b0 + bc], d, labels[b0:b0 + bc], part_max[:, b0:], part_sum[:, b0:], part_pos[:, b0:],
                    col_part[0], col_part[1], *strides, B, bc, N, D, scale_log2, SYMMETRIC=params.symmetric,
                    UPCAST=upcast)
            if params.symmetric:
                stats = _combine(col_part[0], col_part[1])
                col_max, col_sum = stats if col_max is None else _combine(
                    torch.stack([col_max, stats[0]]), torch.stack([col_sum, stats[1]]))
        row_max, row_sum = _combine(part_max, part_sum)
        pos = part_pos.sum(0)  # only the split holding the positive contributes
        per_query = (row_max - pos) + torch.log2(row_sum)
        if params.symmetric:
            per_query = 0.5 * (per_query + (col_max[labels] - pos) + torch.log2(col_sum[labels]))
        ctx.save_for_backward(q, d, labels, row_max, row_sum, col_max, col_sum)
        ctx.params = params
        return per_query * _LN2

    @staticmethod
    @first_derivative_only
    def backward(ctx, grad_per_query):
        q, d, labels, row_max, row_sum, col_max, col_sum = ctx.saved_tensors
        params = ctx.params
        B, D = q.shape
        N = d.shape[0]
        g = grad_per_query.float().contiguous()
        a, col_w = g, None
        if params.symmetric:
            a = 0.5 * g
            # G_j = sum of a_i over the queries whose positive is doc j (duplicate labels add up).
            col_w = torch.zeros(N, device=g.device, dtype=torch.float32).index_put_((labels,), a, accumulate=True)
            col_w = col_w / col_sum
        inputs = (q, d, labels, row_max, col_max, a / row_sum, g, col_w)
        flags = dict(SYMMETRIC=params.symmetric, UPCAST=dot_upcast(params.dtype))
        scale = 1.0 / params.temperature
        chunk = _doc_chunk(B, N, q.element_size())
        dq = dd = None
        for n_start in range(0, N, chunk):
            width = min(chunk, N - n_start)
            ds = torch.empty(B, width, device=q.device, dtype=q.dtype)
            _launch(_contrastive_dlogits_kernel, _dlogits_tuned,
                    lambda blocks, w=width: (triton.cdiv(B, blocks["BLOCK_M"]), triton.cdiv(w, blocks["BLOCK_N"])),
                    *inputs, ds, *q.stride(), *d.stride(), B, n_start, n_start + width, D, _LOG2E / params.temperature,
                    **flags)
            # 1/T is applied to the fp32 products: |dS| <= |g| stays in fp16 range under loss scaling, dS/T may not.
            d_chunk = d[n_start:n_start + width]
            dq = mm_fp32(ds, d_chunk, scale, add_to=dq)
            dd_chunk = mm_fp32(ds.t(), q, scale)
            if width == N:
                dd = dd_chunk
            else:
                if dd is None:
                    dd = torch.empty(N, D, device=q.device, dtype=torch.float32)
                dd[n_start:n_start + width] = dd_chunk
        return dq.to(ctx.input_dtypes[0]), dd.to(ctx.input_dtypes[1]), None, None


def contrastive_loss_triton(queries: torch.Tensor, docs: torch.Tensor, labels: torch.Tensor, temperature: float,
                            normalize: bool, symmetric: bool, reduction: str) -> torch.Tensor:
    """queries `[B, D]`, docs `[N, D]` (float32/float16/bfloat16, any strides), labels int64 `[B]` -> scalar
    (`[B]` for reduction "none") in fp32, computed in fp32. Differentiable in queries and docs.

    Arguments are assumed validated by `check_contrastive_loss`.
    """
    params = _ContrastiveParams(float(temperature), symmetric, queries.dtype)
    if normalize:
        queries, docs = F.normalize(queries.float(), dim=-1), F.normalize(docs.float(), dim=-1)
    per_query = _ContrastiveLossFn.apply(queries, docs, labels.to(torch.int64).contiguous(), params)  # fp32 [B]
    return reduce_losses(per_query, reduction)
