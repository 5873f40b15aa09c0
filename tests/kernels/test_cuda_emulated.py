"""The CUDA kernels of csrc/ run on the CPU: compiled by the host compiler against tests/cuda_emulation (one
fiber per CUDA thread, warp collectives and the PTX of mma/ldmatrix/cp.async emulated) and compared with the
float64 references. This checks the kernels' index arithmetic, fragment layouts, barriers and copy pipeline
on every machine; speed, and the compiled code itself, still need the `gpu` tests of test_cuda_extension.py.

Every tensor a kernel sees sits inside a buffer of 0xff bytes (NaN, or -1 for integers), so a read past it
shows as NaN and a write past it as changed guard bytes."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from llm2comp_kernels.contrastive_loss.reference import contrastive_loss_reference
from llm2comp_kernels.memory_attention.reference import memory_attention_lse_reference, memory_attention_reference
from llm2comp_kernels.span_mean_pool.reference import span_mean_pool_reference
from llm2comp_kernels.testing import make_attention_inputs, make_contrastive_inputs, make_pool_inputs, rel_err
from tests.cuda_emulation import EmulationError, Guards, call, torch_ops
from tests.utils import assert_rel_close

# (order, land cp.async copies when issued): forward/reverse/shuffled thread order, each with copies landing
# at their wait (catches reads before the wait) and at issue (catches overwrites of a tile still being read).
SCHEDULES = [(order, at_issue) for at_issue in (False, True) for order in (0, 1, 2)]


# ---- memory_attention --------------------------------------------------------------------------------


def run_attention(emulated, q, k, v, seq_lens, causal, layout="bhld", with_lse=True, block_warps=4):
    """The emulated CUDA forward on guarded copies -> (out, lse or None); layout "blhd" passes q/k/v as
    transposed views of [B, L, H, d] tensors (strides the binding accepts)."""
    guards = Guards()
    B, Hq, L, d = q.shape

    def place(x):
        if layout == "blhd":
            return guards(x.transpose(1, 2).contiguous()).transpose(1, 2)
        return guards(x.contiguous())

    out, lse = torch_ops.memory_attention_fwd(emulated, place(q), place(k), place(v), seq_lens, causal, d ** -0.5,
                                              with_lse, block_warps, place=guards)
    guards.check()
    return out, lse if with_lse else None


def check_attention(result, q, k, v, seq_lens, causal):
    """Error vs float64 at most twice that of the reference computed in q's dtype (which rounds only the
    output); padded rows exactly zero; the log-sum-exps within fp32 rounding of scores from rounded inputs."""
    out, lse = result
    d = q.shape[-1]
    exact = memory_attention_reference(q.double(), k.double(), v.double(), seq_lens, causal, d ** -0.5)
    same_dtype = memory_attention_reference(q, k, v, seq_lens, causal, d ** -0.5)
    assert torch.isfinite(out).all(), "NaN or inf in the output (a tile read before it was written?)"
    assert rel_err(out, exact) <= 2 * rel_err(same_dtype, exact) + 1e-6, (rel_err(out, exact),
                                                                          rel_err(same_dtype, exact))
    for b, n in enumerate(seq_lens.tolist()):
        assert bool((out[b, :, n:] == 0).all()), f"padded rows of batch row {b} are not zero"
    if lse is not None:
        ref_lse = memory_attention_lse_reference(q.double(), k.double(), seq_lens, causal, d ** -0.5)
        assert (lse - ref_lse).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("L,Hq,Hkv", [(1, 4, 4), (17, 6, 2), (64, 8, 1), (130, 6, 2)])
def test_memory_attention(emulated, L, Hq, Hkv, d, causal, dtype):
    q, k, v, seq_lens = make_attention_inputs(3, Hq, Hkv, L, d, dtype=dtype, requires_grad=False)
    check_attention(run_attention(emulated, q, k, v, seq_lens, causal), q, k, v, seq_lens, causal)


@pytest.mark.parametrize("order,at_issue", SCHEDULES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("block_warps", [4, 8])
def test_memory_attention_schedules(emulated, order, at_issue, causal, block_warps):
    """Lengths on either side of the 64-key blocks, one over five blocks (the cp.async double buffer), and
    lengths that leave whole warps of a query block idle; non-contiguous [B, L, H, d] views."""
    call(emulated, "emu_set_schedule", order, 7, at_issue)
    seq_lens = torch.tensor([63, 64, 65, 129, 300])
    q, k, v, _ = make_attention_inputs(5, 2, 1, 300, 64, dtype=torch.bfloat16, requires_grad=False)
    out = run_attention(emulated, q, k, v, seq_lens, causal, layout="blhd", block_warps=block_warps)
    check_attention(out, q, k, v, seq_lens, causal)


def take_counts(emulated) -> dict[str, int]:
    """The emulator's work counts since the last call (emu::Counts)."""
    counts = torch.zeros(4, dtype=torch.int64)
    emulated.emu_take_counts(ctypes.c_void_p(counts.data_ptr()))
    return dict(zip(("ldmatrix_phases", "wavefronts", "mma", "cp_async_bytes"), counts.tolist()))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block_warps", [4, 8])
def test_memory_attention_ldmatrix_is_conflict_free(emulated, d, block_warps):
    """The row padding of the shared-memory tiles (kPad) puts the 8 rows of every ldmatrix phase, Q, K and
    transposed V alike, in distinct banks: one wavefront per phase."""
    q, k, v, seq_lens = make_attention_inputs(1, 1, 1, 130, d, dtype=torch.bfloat16, requires_grad=False,
                                              seq_lens=torch.tensor([130]))
    take_counts(emulated)
    run_attention(emulated, q, k, v, seq_lens, False, block_warps=block_warps)
    counts = take_counts(emulated)
    assert 0 < counts["ldmatrix_phases"] == counts["wavefronts"], counts


def attention_work(emulated, seq_lens, causal, L=256, d=64, block_warps=4):
    q, k, v, _ = make_attention_inputs(len(seq_lens), 2, 1, L, d, dtype=torch.bfloat16, requires_grad=False)
    take_counts(emulated)
    run_attention(emulated, q, k, v, torch.tensor(seq_lens), causal, block_warps=block_warps)
    return take_counts(emulated)


def test_memory_attention_cost_tracks_real_tokens(emulated):
    """Padding is skipped, not masked: half-length rows (blocks of 64 keys and queries) take a quarter of the
    tensor-core products (half the query blocks, each over half the key blocks) and load about a quarter of
    the bytes; causal rows stop at the diagonal block (1 + 2 + 3 + 4 of 16 key blocks). At 80 tokens the
    second query block has one warp with real rows, and only it computes: (4 + 1) warps x 2 key blocks, against
    16 warps x 4 key blocks unpadded."""
    full = attention_work(emulated, [256, 256], False)
    half = attention_work(emulated, [128, 128], False)
    short = attention_work(emulated, [80, 80], False)
    causal = attention_work(emulated, [256, 256], True)
    assert half["mma"] * 4 == full["mma"], (half, full)
    assert short["mma"] * 64 == full["mma"] * 10, (short, full)
    assert half["cp_async_bytes"] < 0.3 * full["cp_async_bytes"], (half, full)
    assert causal["mma"] * 16 == full["mma"] * 10, (causal, full)


def test_memory_attention_eight_warps_halve_the_tile_loads(emulated):
    """128-query blocks load each K/V tile once for twice the queries: the same tensor-core products, about
    half the bytes (Q itself is loaded once either way)."""
    four = attention_work(emulated, [256, 256], False)
    eight = attention_work(emulated, [256, 256], False, block_warps=8)
    assert eight["mma"] == four["mma"]
    assert eight["cp_async_bytes"] < 0.6 * four["cp_async_bytes"], (eight, four)


@pytest.mark.parametrize("case", range(10))
def test_memory_attention_random_configs(emulated, case):
    """Random batch, heads, length, lengths, head dim, dtype, layout and thread schedule (seeded by `case`)."""
    g = torch.Generator().manual_seed(case)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    B, Hkv, group, d = pick([1, 2, 4]), pick([1, 2]), pick([1, 3, 4]), pick([64, 128])
    L = int(torch.randint(1, 200, (1,), generator=g))
    seq_lens = torch.randint(1, L + 1, (B,), generator=g)
    seq_lens[0] = L
    causal, dtype, layout = pick([False, True]), pick([torch.bfloat16, torch.float16]), pick(["bhld", "blhd"])
    block_warps = pick([4, 8])
    call(emulated, "emu_set_schedule", pick([0, 1, 2]), case, pick([False, True]))
    q, k, v, _ = make_attention_inputs(B, Hkv * group, Hkv, L, d, dtype=dtype, requires_grad=False, seed=case)
    out = run_attention(emulated, q, k, v, seq_lens, causal, layout=layout, block_warps=block_warps)
    check_attention(out, q, k, v, seq_lens, causal)


def test_memory_attention_unsupported_block_warps(emulated):
    q, k, v, seq_lens = make_attention_inputs(1, 2, 2, 8, 64, dtype=torch.bfloat16, requires_grad=False)
    with pytest.raises(EmulationError, match="cudaError_t"):
        run_attention(emulated, q, k, v, seq_lens, False, block_warps=6)


def test_memory_attention_unsupported_head_dim(emulated):
    q, k, v, seq_lens = make_attention_inputs(1, 2, 2, 8, 80, dtype=torch.bfloat16, requires_grad=False)
    with pytest.raises(EmulationError, match="cudaError_t"):
        run_attention(emulated, q, k, v, seq_lens, False)


def test_memory_attention_failed_smem_opt_in_is_not_left_pending(emulated):
    """On a device with 99 KiB of opt-in shared memory (sm_86/sm_89), head dim 128 with 8 warps cannot launch;
    the launcher clears the failed cudaFuncSetAttribute, or the next launch of any op would report it."""
    previous = emulated.emu_set_device_dynamic_smem(99 << 10)
    try:
        q, k, v, seq_lens = make_attention_inputs(1, 2, 2, 8, 128, dtype=torch.bfloat16, requires_grad=False)
        with pytest.raises(EmulationError, match="cudaError_t"):
            run_attention(emulated, q, k, v, seq_lens, False, block_warps=8)
        result = run_attention(emulated, q, k, v, seq_lens, False, block_warps=4)
    finally:
        emulated.emu_set_device_dynamic_smem(previous)
    check_attention(result, q, k, v, seq_lens, False)


def test_memory_attention_without_lse(emulated):
    """lse nullptr (inference): the output alone, the same as with it."""
    q, k, v, seq_lens = make_attention_inputs(3, 4, 2, 70, 64, dtype=torch.bfloat16, requires_grad=False)
    out, _ = run_attention(emulated, q, k, v, seq_lens, True, with_lse=False)
    assert torch.equal(out, run_attention(emulated, q, k, v, seq_lens, True)[0])


# ---- span_mean_pool ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("D", [13, 40, 300, 1032])  # scalar path, vector path, several D-tiles of each
def test_span_mean_pool(emulated, D, dtype):
    hidden, start, length = make_pool_inputs(5, 9, D, dtype=dtype, requires_grad=False)
    start[0], length[0] = 0, 9   # the whole row
    start[1], length[1] = 8, 1   # the last position alone
    guards = Guards()
    out = torch_ops.span_mean_pool_fwd(emulated, hidden, start, length, place=guards)
    ref = span_mean_pool_reference(hidden.double(), start, length)
    assert_rel_close(out, ref, tol=2 * rel_err(ref.to(dtype), ref) + 1e-7)

    grad_out = torch.randn(5, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad_hidden = torch_ops.span_mean_pool_bwd(emulated, grad_out, start, length, 9, place=guards)
    guards.check()
    assert torch.equal(grad_hidden, pool_grad(grad_out, start, length, 9))


def test_span_mean_pool_invalid_span_gives_nan(emulated):
    """Spans the Python API rejects, passed straight to the kernels (a direct torch.ops call): NaN rows, no read
    outside the row (row 0 runs past L into row 1, row 1 starts before its row), other rows unchanged."""
    hidden, start, length = make_pool_inputs(3, 6, 16, requires_grad=False)
    start[0], length[0] = 4, 4
    start[1], length[1] = -2, 3
    guards = Guards()
    out = torch_ops.span_mean_pool_fwd(emulated, hidden, start, length, place=guards)
    grad_hidden = torch_ops.span_mean_pool_bwd(emulated, torch.ones(3, 16), start, length, 6, place=guards)
    guards.check()
    assert out[:2].isnan().all() and grad_hidden[:2].isnan().all()
    assert_rel_close(out[2], span_mean_pool_reference(hidden[2:].double(), start[2:], length[2:])[0], tol=1e-6)
    assert torch.equal(grad_hidden[2], pool_grad(torch.ones(1, 16), start[2:], length[2:], 6)[0])


def pool_grad(grad_out, start, length, L):
    """`[B, L, D]`: grad_out / length inside each span (fp32 product, rounded once), exact zeros outside."""
    pos = torch.arange(L)
    inside = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    scaled = grad_out.float()[:, None] * (1.0 / length.float())[:, None, None]
    return torch.where(inside[..., None], scaled, 0.0).to(grad_out.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_span_mean_pool_misaligned(emulated, dtype):
    """Tensors one element past 16-byte alignment: the launcher falls back to scalar accesses (a 16-byte vector
    access there would stop the run under UBSan)."""
    hidden, start, length = make_pool_inputs(3, 5, 40, dtype=dtype, requires_grad=False)
    guards = Guards(shift=1)
    out = torch_ops.span_mean_pool_fwd(emulated, hidden, start, length, place=guards)
    grad_hidden = torch_ops.span_mean_pool_bwd(emulated, out, start, length, 5, place=guards)
    guards.check()
    ref = span_mean_pool_reference(hidden.double(), start, length)
    assert_rel_close(out, ref, tol=2 * rel_err(ref.to(dtype), ref) + 1e-7)
    assert torch.equal(grad_hidden, pool_grad(out, start, length, 5))


# ---- contrastive_loss --------------------------------------------------------------------------------

def emulated_contrastive(emulated, queries, docs, labels, temperature, symmetric, chunk, grad):
    """Per-query losses and fp32 gradients of queries and docs from the emulated ops, on guarded tensors."""
    guards = Guards()
    loss, row_stats, col_stats = torch_ops.contrastive_loss_fwd(emulated, queries, docs, labels, temperature, symmetric,
                                                                chunk, place=guards)
    dq, dd = torch_ops.contrastive_loss_bwd(emulated, grad, queries, docs, labels, row_stats, col_stats, temperature,
                                            symmetric, chunk, place=guards)
    guards.check()
    return loss, dq, dd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "symmetric"])
@pytest.mark.parametrize("B,N,chunk", [(1, 1, 256), (37, 37, 16), (37, 116, 50), (300, 300, 256)])
def test_contrastive_loss(emulated, B, N, chunk, symmetric, dtype):
    queries, docs = make_contrastive_inputs(B, N, 24, dtype=dtype, requires_grad=False, positive_weight=0.15)
    labels = torch.arange(B)
    if B > 1:
        labels = labels.roll(1)
        labels[0] = labels[1]  # a repeated positive: two queries feed one doc's column weight
    grad = torch.rand(B, generator=torch.Generator().manual_seed(3))
    loss, dq, dd = emulated_contrastive(emulated, queries, docs, labels, 0.05, symmetric, chunk, grad)

    q64 = queries.double().requires_grad_()
    d64 = docs.double().requires_grad_()
    ref = contrastive_loss_reference(q64, d64, labels, 0.05, normalize=False, symmetric=symmetric, reduction="none")
    ref.backward(grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: dS is rounded to bf16 for the gradient GEMMs
    assert_rel_close(loss, ref, tol=1e-5, name="loss")
    assert_rel_close(dq, q64.grad, tol=tol, name="dq")
    assert_rel_close(dd, d64.grad, tol=tol, name="dd")


def test_contrastive_loss_extreme_inputs(emulated):
    """An all-equal batch of huge vectors: logits near 1e8 / T, yet finite losses (log N) and gradients."""
    queries = torch.full((9, 16), 3e3)
    loss, dq, dd = emulated_contrastive(emulated, queries, queries.clone(), torch.arange(9), 0.05, True, 256,
                                        torch.ones(9))
    assert torch.isfinite(loss).all() and torch.isfinite(dq).all() and torch.isfinite(dd).all()
    assert_rel_close(loss, torch.full((9,), math.log(9.0)), tol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "symmetric"])
def test_contrastive_loss_finalize_rejects_bad_labels(emulated, symmetric):
    """A label outside [0, N) (a direct torch.ops call) gives a NaN loss, without reading column statistics
    outside [0, N); the other queries' losses are unchanged."""
    B, N = 4, 3
    guards = Guards()
    row_stats = guards(torch.tensor([[2.0, 1.5]] * B))
    col_stats = guards(torch.tensor([[1.0, 2.0]] * N))
    labels = guards(torch.tensor([0, N, -1, 2]))
    loss = guards(torch.ones(B))  # the positive logits on entry
    call(emulated, "emu_contrastive_loss_finalize", row_stats, col_stats if symmetric else None, labels, loss, B, N)
    guards.check()
    assert loss[1:3].isnan().all()
    row = (2.0 - 1.0) + math.log2(1.5)
    expected = 0.5 * (row + (1.0 - 1.0) + 1.0) if symmetric else row
    assert_rel_close(loss[[0, 3]], torch.full((2,), expected * math.log(2.0)), tol=1e-6)


def test_contrastive_loss_doc_chunk(emulated):
    chunk = emulated.emu_contrastive_loss_doc_chunk
    assert chunk(1024, 100_000, 4) == (128 << 20) // (1024 * 4)  # the 128 MiB budget, a multiple of 256
    assert chunk(1024, 1000, 4) == 1000                          # never more than N
    assert chunk(1 << 20, 100_000, 6) == 256                     # at least 256 however large B
    assert chunk(1 << 20, 100, 6) == 100
