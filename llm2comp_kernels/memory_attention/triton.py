"""Triton backend of `memory_attention`: flash-attention style forward and backward over right-padded rows.

Three kernels plus a tiny preprocess, none with atomics:

- `_memory_attention_fwd_kernel`: one program per (query block, batch row, q head). Online softmax in fp32
  over key blocks ``0 .. seq_lens[b]`` only (causal: up to the block's last query too); saves the per-row
  log-sum-exp (base 2) for the backward.
- `_memory_attention_bwd_delta_kernel`: ``delta = rowsum(dO * O)`` per query row.
- `_memory_attention_bwd_dkdv_kernel`: one program per (key block, batch row, kv head); it loops over the
  kv head's group of q heads, so the GQA sum happens in registers instead of through atomics.
- `_memory_attention_bwd_dq_kernel`: one program per (query block, batch row, q head).

And `_dropout_keep_kernel`, which writes out the dropout mask the others draw (`dropout_keep_mask`, for tests).

Attention dropout (``dropout_p > 0``, a separate compile-time variant: ``DROPOUT=False`` compiles the kernels
without a trace of it) keeps probability (b, h, i, j) when the uniform float of
``Philox(key=seed, counter=(j, i, b * Hq + h, offset))`` is ``>= dropout_p``: a counter of the element's global
indices, so the forward and both backward kernels draw the same number for it whatever their block sizes.
(seed, offset) are drawn per call from torch's default generator of the device (`draw_philox`) into a two-element
int64 tensor the kernels read: restoring torch's RNG state replays the masks, and no host sync is needed. The mask
is never stored; the backward regenerates it. The saved log-sum-exp is that of the undropped softmax.

Padding is skipped: blocks past ``seq_lens[b]`` load nothing and only write zeros, and rows past it inside a
partial block are loaded as zeros (whatever the padding holds, even NaN, never reaches a result). The head
dim is padded to the next power of two inside the kernels with masked loads. Block sizes are autotuned on a
GPU (keyed on the padded head dim, causal, dtypes and a power-of-two bucket of L; after its first call a key
launches with its config directly, see `TunedLauncher`); under ``TRITON_INTERPRET=1``
or with ``LLM2COMP_TRITON_AUTOTUNE=0`` a fixed small config (`_FIXED_BLOCKS`) is used, with unequal
query/key blocks so the tests exercise block edges that do not line up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._autograd import first_derivative_only, needs_autograd
from .._backends import triton_autotune, triton_interpret
from .._triton_common import TunedLauncher, dot, dot_upcast

_LOG2E = 1.4426950408889634

# Fixed (BLOCK_M, BLOCK_N) per kernel when not autotuning: always under the CPU interpreter (tuning there
# would only time numpy), and on a GPU when LLM2COMP_TRITON_AUTOTUNE=0 (the tests set it: tuning compiles
# every config for each head dim, dtype and causal flag). Query and key blocks differ on purpose so that
# causal and padding edges fall mid-block.
_FIXED_BLOCKS = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)}


def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# (BLOCK_M, BLOCK_N, num_warps, num_stages): few per kernel, since each one compiles per head dim, dtype and
# causal flag. `_prune` drops tiles whose fp32 accumulators would not fit in registers. At d=128 on sm_90 the
# first three dk/dv configs spill registers and the next two do not. The last config of each kernel is for
# head dims 160-256 (Gemma's 256): the others spill there, and at sm_80 the forward's exceed shared memory.
# float32 inputs multiply in IEEE fp32 (no tensor cores) and take twice the bytes: the bf16/fp16 tiles spill
# and at d=128 exceed sm_80's shared memory, so they tune over smaller tiles of their own.
# `python .ci/compile_triton.py --only memory_attention --head-dims 64 128 256` prints registers, spills and
# shared memory per config.
_CONFIGS = {
    "fwd": _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 8, 2)]),
    "dq": _configs([(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 8, 2)]),
    "dkdv": _configs([(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 3), (32, 128, 8, 2), (64, 64, 8, 2),
                      (32, 32, 8, 2)]),
}
# Only for dropout launches (the Philox state takes registers): at head dim 256 on sm_90 every bf16 dq config
# above spills with dropout, and this one does not.
_DROPOUT_CONFIGS = {
    "fwd": [],
    "dq": _configs([(64, 16, 8, 2)]),
    "dkdv": [],
}
_FP32_CONFIGS = {
    "fwd": _configs([(32, 32, 4, 2), (32, 16, 4, 2)]),
    "dq": _configs([(32, 32, 4, 2), (32, 16, 4, 2)]),
    "dkdv": _configs([(32, 32, 4, 2), (16, 32, 4, 2)]),
}
_TUNE_KEY = ["BLOCK_D", "CAUSAL", "DROPOUT", "L_BUCKET"]  # the autotuner adds the tensors' dtypes to the key
_MAX_ACC_ELEMENTS = 128 * 128  # per accumulator tile [rows, BLOCK_D]


def _pruner(fp32_configs, dropout_configs=()):
    """`early_config_prune` that keeps the configs of the inputs' dtype (`fp32_configs` for float32, the others
    otherwise; `dropout_configs` only for launches with DROPOUT) whose [BLOCK_M or BLOCK_N, BLOCK_D] accumulator
    fits; always keeps the smallest."""
    fp32_ids, dropout_ids = {id(c) for c in fp32_configs}, {id(c) for c in dropout_configs}

    def prune(configs, named_args, **kwargs):
        fp32 = named_args["Q"].dtype == torch.float32
        dropout = kwargs.get("DROPOUT", named_args.get("DROPOUT", False))
        pool = [c for c in configs if (id(c) in fp32_ids) == fp32 and (dropout or id(c) not in dropout_ids)]
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        def rows(c):
            return max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"])
        kept = [c for c in pool if rows(c) * block_d <= _MAX_ACC_ELEMENTS]
        return kept or [min(pool, key=rows)]
    return prune


@triton.jit
def _rows(base, offs, stride_row, stride_d, real, D, BLOCK_D: tl.constexpr):
    """The `[rows, BLOCK_D]` tile of rows `offs` at `base`; rows where `real` is False and columns >= D read as 0."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(base + offs[:, None] * stride_row + offs_d[None, :] * stride_d,
                   mask=real[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _store_rows(base, offs, stride_row, stride_d, tile, L, D, BLOCK_D: tl.constexpr):
    """Store the fp32 `tile` `[rows, BLOCK_D]` at rows `offs` of `base` in base's dtype: rows < L, columns < D."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(base + offs[:, None] * stride_row + offs_d[None, :] * stride_d, tile.to(base.dtype.element_ty),
             mask=(offs < L)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _philox(PHILOX):
    """(seed, offset) of this call's dropout masks, from the int64 `[2]` tensor `draw_philox` filled."""
    return tl.load(PHILOX), tl.load(PHILOX + 1)


@triton.jit
def _dropout_keep(seed, offset, pid_bh, rows, cols, dropout_p):
    """Bool tile: whether probability (query `rows`, key `cols`) of head row `pid_bh` = b * Hq + h is kept.
    `rows` and `cols` broadcast to the tile's shape. Each element's Philox counter is (j, i, b * Hq + h, offset),
    its global indices only, so every kernel and block size draws the same number for it; 32-bit words, so the
    tile carries no 64-bit index arithmetic (what ``tl.rand(seed, flat_index)`` costs in registers)."""
    r, _, _, _ = tl.philox(seed, cols.to(tl.uint32), rows.to(tl.uint32), pid_bh.to(tl.uint32),
                           offset.to(tl.uint32))
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _dropout_keep_kernel(PHILOX, KEEP, Hq, L, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KEEP int8 `[B, Hq, L, L]` (contiguous): the keep mask the attention kernels draw from PHILOX."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * Hq + h
    seed, offset = _philox(PHILOX)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, offset, pid_bh, offs_m[:, None], offs_n[None, :], dropout_p)
        tl.store(KEEP + (pid_bh * L + offs_m[:, None]) * L + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m < L)[:, None] & (offs_n < L)[None, :])


@triton.jit
def _query_block(SEQ_LENS, Hq, GROUP, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query block (program ids: query block, q head, batch row): (b * Hq + h, b, h, the kv
    head, seq_lens[b], the block's rows, which of them are real, and the end of the keys they read: 0 for a block
    wholly in the padding, so that nothing of its row is loaded; causal: up to the block's last row)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * Hq + h
    seq_len = tl.load(SEQ_LENS + b).to(tl.int32)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    end_n = tl.where(start_m < seq_len, seq_len, 0)
    if CAUSAL:
        end_n = tl.minimum(end_n, start_m + BLOCK_M)
    return pid_bh, b, h, h // GROUP, seq_len, offs_m, offs_m < seq_len, end_n


@triton.jit
def _memory_attention_fwd_kernel(
    Q, K, V, O, LSE, SEQ_LENS, PHILOX,  # Q/O [B, Hq, L, D], K/V [B, Hkv, L, D] (any strides), LSE fp32 [B, Hq, L],
    stride_qb, stride_qh, stride_ql, stride_qd,  # SEQ_LENS [B], PHILOX int64 [2] (read only with DROPOUT)
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    Hq, GROUP, L, D, L_BUCKET, scale_log2, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, seq_len, offs_m, row_real, end_n = _query_block(SEQ_LENS, Hq, GROUP, CAUSAL, BLOCK_M)
    if DROPOUT:
        seed, offset = _philox(PHILOX)
    q = _rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, stride_qd, row_real, D, BLOCK_D)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_real = offs_n < seq_len
        k = _rows(k_base, offs_n, stride_kl, stride_kd, col_real, D, BLOCK_D)
        v = _rows(v_base, offs_n, stride_vl, stride_vd, col_real, D, BLOCK_D)
        s = dot(q, tl.trans(k), DOT_UPCAST) * scale_log2
        allowed = col_real[None, :]
        if CAUSAL:
            allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(allowed, s, float("-inf"))
        # Key 0 is in the first block and allowed for every row, so m_new is finite from the first step on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the undropped softmax's normalizer
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, offset, pid_bh, offs_m[:, None], offs_n[None, :], dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    norm = l_safe
    if DROPOUT:
        norm = l_safe * (1.0 - dropout_p)  # kept probabilities scaled by 1 / (1 - p)
    out = tl.where(row_real[:, None], acc / norm[:, None], 0.0)
    _store_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_ol, stride_od, out, L, D, BLOCK_D)
    lse = tl.where(row_real, m_i + tl.log2(l_safe), 0.0)
    tl.store(LSE + pid_bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _memory_attention_bwd_delta_kernel(
    O, DO, DELTA, SEQ_LENS,  # O/DO [B, Hq, L, D] (any strides), DELTA fp32 [B, Hq, L], SEQ_LENS [B]
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    Hq, L, D,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * Hq + h
    seq_len = tl.load(SEQ_LENS + b).to(tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_real = offs_m < seq_len
    o = _rows(O + b * stride_ob + h * stride_oh, offs_m, stride_ol, stride_od, row_real, D, BLOCK_D)
    do = _rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dol, stride_dod, row_real, D, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _memory_attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, SEQ_LENS, PHILOX,  # Q/DO [B, Hq, L, D], K/V/DK/DV [B, Hkv, L, D],
    stride_qb, stride_qh, stride_ql, stride_qd,        # LSE/DELTA [B, Hq, L], PHILOX int64 [2]
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    Hq, Hkv, GROUP, L, D, L_BUCKET, scale, scale_log2, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + b).to(tl.int32)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_real = offs_n < seq_len
    k = _rows(K + b * stride_kb + hk * stride_kh, offs_n, stride_kl, stride_kd, col_real, D, BLOCK_D)
    v = _rows(V + b * stride_vb + hk * stride_vh, offs_n, stride_vl, stride_vd, col_real, D, BLOCK_D)

    # Causal: queries before this key block never see it, so start at the query block holding start_n.
    start_q = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    end_q = tl.where(start_n < seq_len, seq_len, 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if DROPOUT:
        seed, offset = _philox(PHILOX)
        keep_scale = 1.0 / (1.0 - dropout_p)
    # With dropout (Z: keep / (1 - p), O = (P * Z) V): dV = (P * Z)^T dO, dS = P * (Z * dO V^T - delta), where
    # delta = rowsum(dO * O) of the dropped O (= rowsum(P * Z * dO V^T)).
    # Work in the transposed layout (keys on rows) so no [BLOCK_M, BLOCK_N] tile needs a transpose.
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * Hq + h) * L
        for start_m in range(start_q, end_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_real = offs_m < seq_len
            q = _rows(q_base, offs_m, stride_ql, stride_qd, row_real, D, BLOCK_D)
            do = _rows(do_base, offs_m, stride_dol, stride_dod, row_real, D, BLOCK_D)
            lse = tl.load(LSE + row_base + offs_m, mask=row_real, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=row_real, other=0.0)
            s_t = dot(k, tl.trans(q), DOT_UPCAST) * scale_log2
            allowed = col_real[:, None] & row_real[None, :]
            if CAUSAL:
                allowed = allowed & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
            if DROPOUT:
                keep_t = _dropout_keep(seed, offset, b * Hq + h, offs_m[None, :], offs_n[:, None], dropout_p)
                dv += dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, DOT_UPCAST)  # scaled after the loop
            else:
                dv += dot(p_t.to(do.dtype), do, DOT_UPCAST)
            dp_t = dot(v, tl.trans(do), DOT_UPCAST)
            if DROPOUT:
                dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += dot(ds_t.to(q.dtype), q, DOT_UPCAST)

    if DROPOUT:
        dv = dv * keep_scale
    # Padded key rows got no contribution (p_t is 0 there), so they store exact zeros.
    _store_rows(DK + b * stride_dkb + hk * stride_dkh, offs_n, stride_dkl, stride_dkd, dk * scale, L, D, BLOCK_D)
    _store_rows(DV + b * stride_dvb + hk * stride_dvh, offs_n, stride_dvl, stride_dvd, dv, L, D, BLOCK_D)


@triton.jit
def _memory_attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, SEQ_LENS, PHILOX,  # Q/DO/DQ [B, Hq, L, D], K/V [B, Hkv, L, D],
    stride_qb, stride_qh, stride_ql, stride_qd,    # LSE/DELTA fp32 [B, Hq, L], PHILOX int64 [2]
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    Hq, GROUP, L, D, L_BUCKET, scale, scale_log2, dropout_p,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, seq_len, offs_m, row_real, end_n = _query_block(SEQ_LENS, Hq, GROUP, CAUSAL, BLOCK_M)
    if DROPOUT:
        seed, offset = _philox(PHILOX)
        keep_scale = 1.0 / (1.0 - dropout_p)
    q = _rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_ql, stride_qd, row_real, D, BLOCK_D)
    do = _rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dol, stride_dod, row_real, D, BLOCK_D)
    lse = tl.load(LSE + pid_bh * L + offs_m, mask=row_real, other=0.0)
    delta = tl.load(DELTA + pid_bh * L + offs_m, mask=row_real, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_real = offs_n < seq_len
        k = _rows(k_base, offs_n, stride_kl, stride_kd, col_real, D, BLOCK_D)
        v = _rows(v_base, offs_n, stride_vl, stride_vd, col_real, D, BLOCK_D)
        s = dot(q, tl.trans(k), DOT_UPCAST) * scale_log2
        allowed = row_real[:, None] & col_real[None, :]
        if CAUSAL:
            allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = dot(do, tl.trans(v), DOT_UPCAST)
        if DROPOUT:  # dS = P * (Z * dO V^T - delta), see the dk/dv kernel
            keep = _dropout_keep(seed, offset, pid_bh, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, DOT_UPCAST)

    _store_rows(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dql, stride_dqd, dq * scale, L, D, BLOCK_D)


def _tuned(name, kernel):
    configs, fp32, dropout = _CONFIGS[name], _FP32_CONFIGS[name], _DROPOUT_CONFIGS[name]
    return triton.autotune(configs + dropout + fp32, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(fp32, dropout)})(kernel)


_KERNELS = {"fwd": _memory_attention_fwd_kernel, "dq": _memory_attention_bwd_dq_kernel,
            "dkdv": _memory_attention_bwd_dkdv_kernel}
_LAUNCHERS = {name: TunedLauncher(kernel, _tuned(name, kernel)) for name, kernel in _KERNELS.items()}


def last_tuned_configs() -> dict[str, str]:
    """The config each autotuned kernel ran with last ("fwd", "dq", "dkdv" -> "BLOCK_M/BLOCK_N/warps/stages"),
    for benchmarks to record what the tuner chose; kernels not yet run are absent."""
    return {name: f"{c.kwargs['BLOCK_M']}/{c.kwargs['BLOCK_N']}/{c.num_warps}/{c.num_stages}"
            for name, launcher in _LAUNCHERS.items() if (c := launcher.last) is not None}


def _tune_key(q: torch.Tensor, seq_lens: torch.Tensor, block_d: int, causal: bool, l_bucket: int,
              dropout: bool = False) -> tuple | None:
    """The key the autotuner would compute for this call's launches (`_TUNE_KEY` and every tensor's dtype, which
    q's, seq_lens' and `dropout` decide: o and the gradients have q's, lse and delta are fp32, PHILOX is int64 with
    dropout and seq_lens otherwise), or None when not autotuning."""
    if not triton_autotune():
        return None
    return block_d, causal, dropout, l_bucket, q.dtype, seq_lens.dtype


def _launch(name: str, rows_key: str, L: int, heads: int, B: int, key: tuple | None, *args, **constexprs) -> None:
    """Run kernel `name`, autotuned for `key` (`TunedLauncher`) or with `_FIXED_BLOCKS` when it is None; one
    program per block of `rows_key` ("BLOCK_M" or "BLOCK_N") rows, per head (grid axis 1) and batch row (axis 2:
    B * heads on one axis would pass CUDA's 65535 limit of axes 1 and 2 from B = 2048 at 32 heads)."""
    def grid(meta):
        return triton.cdiv(L, meta[rows_key]), heads, B
    if key is not None:
        _LAUNCHERS[name](key, grid, *args, **constexprs)
    else:
        block_m, block_n = _FIXED_BLOCKS[name]
        blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        _KERNELS[name][grid(blocks)](*args, **constexprs, **blocks)


def _l_bucket(L: int) -> int:
    """Autotune bucket for the sequence length: powers of two from 64 to 8192, so tuning runs a few times."""
    return min(max(1 << (L - 1).bit_length(), 64), 8192)


def _block_d(d: int) -> int:
    """The head dim padded to a power of two, at least 16 (the kernels mask the columns past d)."""
    return max(16, 1 << (d - 1).bit_length())


@dataclass(frozen=True)
class _AttentionParams:
    causal: bool
    scale: float
    dropout_p: float = 0.0


def draw_philox(device: torch.device | str) -> torch.Tensor:
    """int64 `[2]` on `device`: (seed, offset) of one call's dropout masks, drawn from torch's default generator
    of `device` (as SDPA's and flash-attn's dropout draw theirs), so `torch.manual_seed` or a restored RNG state
    replays the masks. On the device, so a launch needs no host sync (and CUDA graphs capture the draw)."""
    return torch.randint(0, 1 << 62, (2,), dtype=torch.int64, device=device)  # the kernels use offset mod 2**32


def dropout_keep_mask(philox: torch.Tensor, B: int, Hq: int, L: int, dropout_p: float) -> torch.Tensor:
    """Bool `[B, Hq, L, L]` on philox's device: which attention probabilities a call drawing `philox`
    (`draw_philox`) with these sizes keeps, for every (i, j), padding and causal future included (the kernels use
    the allowed ones); what the reference's ``keep=`` takes to replay the kernels' dropout."""
    keep = torch.empty(B, Hq, L, L, dtype=torch.int8, device=philox.device)
    block = 16
    _dropout_keep_kernel[(triton.cdiv(L, block), Hq, B)](philox, keep, Hq, L, float(dropout_p),
                                                         BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


def _dropout_args(seq_lens, params: _AttentionParams, philox: torch.Tensor | None) -> tuple:
    """The kernels' (PHILOX, dropout_p) arguments and their DROPOUT flag; without dropout PHILOX is never read
    and seq_lens stands in for it."""
    dropout = params.dropout_p > 0
    return (philox if dropout else seq_lens), params.dropout_p, dropout


def _forward(q, k, v, seq_lens, params: _AttentionParams, philox: torch.Tensor | None = None):
    B, Hq, L, d = q.shape
    Hkv = k.shape[1]
    # Output as a transposed view of [B, L, Hq, d]: the model merges heads with a free reshape.
    o = q.new_empty(B, L, Hq, d).transpose(1, 2)
    lse = torch.empty(B, Hq, L, device=q.device, dtype=torch.float32)
    block_d, bucket = _block_d(d), _l_bucket(L)
    philox_arg, dropout_p, dropout = _dropout_args(seq_lens, params, philox)
    _launch("fwd", "BLOCK_M", L, Hq, B, _tune_key(q, seq_lens, block_d, params.causal, bucket, dropout),
            q, k, v, o, lse, seq_lens, philox_arg, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            Hq, Hq // Hkv, L, d, bucket, params.scale * _LOG2E, dropout_p,
            CAUSAL=params.causal, DROPOUT=dropout, DOT_UPCAST=dot_upcast(q.dtype), BLOCK_D=block_d)
    return o, lse


def _backward(q, k, v, o, lse, seq_lens, do, params: _AttentionParams, philox: torch.Tensor | None = None):
    B, Hq, L, d = q.shape
    Hkv = k.shape[1]
    block_d = _block_d(d)
    delta = torch.empty_like(lse)
    delta_block = 16 if triton_interpret() else 64
    _memory_attention_bwd_delta_kernel[(triton.cdiv(L, delta_block), Hq, B)](
        o, do, delta, seq_lens, *o.stride(), *do.stride(), Hq, L, d, BLOCK_D=block_d, BLOCK_M=delta_block)
    # empty_like keeps the inputs' strides when they are dense, so each grad matches its input's layout.
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    philox_arg, dropout_p, dropout = _dropout_args(seq_lens, params, philox)
    common = dict(CAUSAL=params.causal, DROPOUT=dropout, DOT_UPCAST=dot_upcast(q.dtype), BLOCK_D=block_d)
    bucket = _l_bucket(L)
    key = _tune_key(q, seq_lens, block_d, params.causal, bucket, dropout)
    # With dropout, delta = rowsum(dO * O) of the dropped output O is the backward's D (see the dk/dv kernel).
    _launch("dkdv", "BLOCK_N", L, Hkv, B, key,
            q, k, v, do, dk, dv, lse, delta, seq_lens, philox_arg,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            Hq, Hkv, Hq // Hkv, L, d, bucket, params.scale, params.scale * _LOG2E, dropout_p, **common)
    _launch("dq", "BLOCK_M", L, Hq, B, key,
            q, k, v, do, dq, lse, delta, seq_lens, philox_arg,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            Hq, Hq // Hkv, L, d, bucket, params.scale, params.scale * _LOG2E, dropout_p, **common)
    return dq, dk, dv


class _MemoryAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_lens, params: _AttentionParams, philox: torch.Tensor | None):
        o, lse = _forward(q, k, v, seq_lens, params, philox)
        # The mask is not saved: the backward regenerates it from philox (seed, offset).
        ctx.save_for_backward(q, k, v, o, lse, seq_lens, philox)
        ctx.params = params
        return o

    @staticmethod
    @first_derivative_only
    def backward(ctx, do):
        q, k, v, o, lse, seq_lens, philox = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, seq_lens, do, ctx.params, philox)
        return dq, dk, dv, None, None, None


def memory_attention_triton_backward(q, k, v, seq_lens, out, lse, grad_out, causal: bool, scale: float):
    """(dq, dk, dv) of a forward that saved its output `out` and row log-sum-exps `lse` (fp32 `[B, Hq, L]`, log2
    of the sum of exp2(scores * scale * log2(e)), 0 on padded rows), without dropout: the CUDA forward's
    backward as well as this one's."""
    return _backward(q, k, v, out, lse, seq_lens.contiguous(), grad_out, _AttentionParams(causal, scale))


def memory_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
                            causal: bool, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]` (any strides, float32/float16/bfloat16), seq_lens int `[B]`
    -> `[B, Hq, L, d]` in q's dtype (a transposed view of a `[B, L, Hq, d]` buffer). Differentiable in q, k, v.
    `dropout_p > 0`: attention dropout with masks from `draw_philox` (one draw from torch's generator per call).

    Arguments are assumed validated by `check_memory_attention`.
    """
    params, seq_lens = _AttentionParams(causal, scale, float(dropout_p)), seq_lens.contiguous()
    philox = draw_philox(q.device) if dropout_p > 0 else None
    if not needs_autograd(q, k, v):
        return _forward(q, k, v, seq_lens, params, philox)[0]
    return _MemoryAttentionFn.apply(q, k, v, seq_lens, params, philox)
