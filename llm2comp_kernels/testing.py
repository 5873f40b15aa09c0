"""Input factories and error measures shared by tests and benchmarks."""

from __future__ import annotations

import torch

# Relative-error budgets against a float64 reference (||out - ref|| / ||ref||), by input dtype.
# float32 allows for TF32 tensor-core dots in Triton; bf16/fp16 for rounding of inputs and outputs.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (absolute norm of out when ref is all zeros). NaN stays NaN."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def seq_lens_mixed(B: int, L: int, device="cpu") -> torch.Tensor:
    """int32 `[B]` lengths cycling through 1, a middle value and L (the padding edge cases)."""
    pattern = [1, max(1, (L + 1) // 2), L]
    return torch.tensor([pattern[i % 3] for i in range(B)], dtype=torch.int32, device=device)


def make_attention_inputs(B, Hq, Hkv, L, d, dtype=torch.float32, device="cpu", seq_lens=None, seed=0,
                          requires_grad=True):
    """Random q `[B, Hq, L, d]`, k/v `[B, Hkv, L, d]` and seq_lens (mixed by default)."""
    g = torch.Generator().manual_seed(seed)
    def rand(h):
        x = torch.randn(B, h, L, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)
    q, k, v = rand(Hq), rand(Hkv), rand(Hkv)
    if seq_lens is None:
        seq_lens = seq_lens_mixed(B, L, device)
    return q, k, v, seq_lens.to(device)


def _generator(seed: int, device, draw_on_device: bool) -> torch.Generator:
    """Seeded on the CPU (the same values whatever `device`: what the tests compare), or on `device` when
    `draw_on_device` (benchmarks' GPU-sized inputs: seconds of single-threaded CPU sampling otherwise)."""
    return torch.Generator(device=device if draw_on_device else "cpu").manual_seed(seed)


def make_pool_inputs(B, L, D, dtype=torch.float32, device="cpu", span=None, seed=0, requires_grad=True,
                     draw_on_device=False):
    """Random hidden `[B, L, D]` with start/length spans of varied offsets (length `span` if given)."""
    g = _generator(seed, device, draw_on_device)
    hidden = torch.randn(B, L, D, generator=g, device=g.device).to(device=device, dtype=dtype)
    hidden.requires_grad_(requires_grad)
    if span is None:
        length = torch.randint(1, L + 1, (B,), generator=g, device=g.device)
    else:
        length = torch.full((B,), min(span, L), dtype=torch.long, device=g.device)
    start = (torch.rand(B, generator=g, device=g.device) * (L - length + 1)).long().clamp(max=L - length)
    return hidden, start.to(device), length.to(device)


def make_contrastive_inputs(B, N, D, dtype=torch.float32, device="cpu", seed=0, requires_grad=True,
                            positive_weight=1.0, draw_on_device=False):
    """Random queries `[B, D]` and docs `[N, D]`, doc i = noise + positive_weight * query i (positives 0..B-1).

    The default makes positives look like their query, as after some training (cosine ~0.7: at temperature
    0.05 the loss is near zero); 0.15 (cosine ~0.15) gives a loss of a few nats, as early in training."""
    g = _generator(seed, device, draw_on_device)
    q = torch.randn(B, D, generator=g, device=g.device)
    d = torch.randn(N, D, generator=g, device=g.device)
    d[: min(B, N)] += positive_weight * q[: min(B, N)]
    return (q.to(device=device, dtype=dtype).requires_grad_(requires_grad),
            d.to(device=device, dtype=dtype).requires_grad_(requires_grad))


def make_linear_kl_inputs(N, H, V, dtype=torch.float32, device="cpu", seed=0, weight_requires_grad=True,
                          teacher_noise=0.5, logit_std=2.0, draw_on_device=False):
    """Student/teacher hidden `[N, H]` (teacher = student + `teacher_noise` x noise: related, as in
    distillation) and LM head `[V, H]` scaled so logits have std ~`logit_std`."""
    g = _generator(seed, device, draw_on_device)
    student = torch.randn(N, H, generator=g, device=g.device)
    teacher = student + teacher_noise * torch.randn(N, H, generator=g, device=g.device)
    weight = torch.randn(V, H, generator=g, device=g.device) * (logit_std / H ** 0.5)
    return (student.to(device=device, dtype=dtype).requires_grad_(True),
            teacher.to(device=device, dtype=dtype),
            weight.to(device=device, dtype=dtype).requires_grad_(weight_requires_grad))
