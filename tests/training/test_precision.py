"""Mixed precision: bf16 where the GPU has it, fp16 with loss scaling where it does not (T4, V100), fp32 on CPU.

fp16 autocast also runs on the CPU, so the loss-scaling path is trained here for real."""

import hashlib
import json
import shutil

import pytest
import torch

from llm2comp import precision
from llm2comp.training import train
from llm2comp.training.checkpoint import latest_checkpoint
from llm2comp.training.config import ConfigError
from llm2comp.training.stages import build_stage
from llm2comp.training.trainer import optimizer_step, resolve_precision

from .test_stages import CPU, _config, _model, _randomize_lora_b

GPU = torch.device("cuda", 0)


@pytest.fixture
def gpu_of(monkeypatch):
    """Pretend `GPU` has the given compute capability."""
    def set_capability(capability):
        monkeypatch.setattr(precision, "compute_capability", lambda device: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    return set_capability


@pytest.mark.parametrize("capability, auto, half", [((7, 5), "fp16", torch.float16), ((7, 0), "fp16", torch.float16),
                                                    ((8, 0), "bf16", torch.bfloat16), ((9, 0), "bf16", torch.bfloat16)])
def test_auto_precision_is_bf16_where_the_gpu_has_it_else_fp16(capability, auto, half, gpu_of, tiny_dir, tmp_path):
    gpu_of(capability)
    cfg = _config("unsupervised", tiny_dir, tmp_path)
    assert resolve_precision(cfg, GPU) == auto and precision.half_dtype(GPU) == half
    assert resolve_precision(cfg, CPU) == "fp32" and precision.half_dtype(CPU) == torch.bfloat16
    for explicit in ("fp16", "fp32"):
        assert resolve_precision(_config("unsupervised", tiny_dir, tmp_path, precision=explicit), GPU) == explicit
    bf16 = _config("unsupervised", tiny_dir, tmp_path, precision="bf16")
    if auto == "bf16":
        assert resolve_precision(bf16, GPU) == "bf16"
    else:
        with pytest.raises(ConfigError, match="--precision bf16: Tesla T4 has no bf16 tensor cores .* use "
                                              "--precision fp16"):
            resolve_precision(bf16, GPU)


def _one_parameter_step(grad: torch.Tensor, max_grad_norm: float, scale: float):
    """(parameter after the step, stepped, the scale after, schedule steps) for one SGD(lr=1) step on `grad`,
    back-propagated from a loss scaled by `scale`."""
    p = torch.nn.Parameter(torch.zeros_like(grad))
    optimizer = torch.optim.SGD([p], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale((p * grad).sum()).backward()
    stepped = optimizer_step([p], optimizer, scheduler, scaler, max_grad_norm)
    assert p.grad is None
    return p.detach(), stepped, scaler.get_scale(), scheduler.last_epoch


def test_optimizer_step_clips_the_unscaled_gradients():
    g = torch.tensor([0.3, -0.4])  # norm 0.5: under the clip norm once unscaled, far over it while scaled
    p, stepped, scale, schedule_steps = _one_parameter_step(g, max_grad_norm=1.0, scale=1024.0)
    assert stepped and scale == 1024.0 and schedule_steps == 1
    torch.testing.assert_close(p, -g, rtol=0, atol=0)
    p, *_ = _one_parameter_step(8 * g, max_grad_norm=1.0, scale=1024.0)  # norm 4: clipped to 1
    torch.testing.assert_close(p, -2 * g, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_optimizer_step_skips_overflowed_gradients_and_halves_the_scale(bad):
    p, stepped, scale, schedule_steps = _one_parameter_step(torch.tensor([0.3, bad]), max_grad_norm=1.0,
                                                            scale=1024.0)
    assert not stepped and scale == 512.0 and schedule_steps == 0
    assert torch.equal(p, torch.zeros(2))


@pytest.mark.parametrize("stage, grad_cache", [("compress", False), ("unsupervised", False), ("unsupervised", True),
                                               ("supervised", True)])
def test_micro_step_back_propagates_the_scaled_loss(stage, grad_cache, tiny_dir, tmp_path, pairs_file):
    kw = {"data": str(pairs_file)} if stage == "supervised" else {}
    if stage != "compress":
        kw.update(grad_cache=grad_cache, chunk_size=3)
    cfg = _config(stage, tiny_dir, tmp_path, lora_dropout=0.0, **kw)
    model = _model(cfg)
    _randomize_lora_b(model)
    work = build_stage(cfg, model, CPU)
    grads = []
    for scale in (None, lambda loss: loss * 8):
        losses = work.micro_step([0, 1, 2], 0) if scale is None else work.micro_step([0, 1, 2], 0, scale)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
        assert losses[0] > 0
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], 8 * g, rtol=1e-5, atol=1e-8, msg=name)


def test_fp16_training_logs_and_checkpoints_its_loss_scale(tiny_dir, tmp_path):
    kw = {"max_steps": 3, "save_every": 2, "batch_size": 2}
    fp16 = train(_config("compress", tiny_dir, tmp_path / "fp16", precision="fp16", **kw), progress=False)
    fp32 = train(_config("compress", tiny_dir, tmp_path / "fp32", precision="fp32", **kw), progress=False)
    assert all("loss_scale" not in r for r in fp32)
    # compress back-propagates loss x target tokens: the initial scale 2^16 is divided by the most there can be
    initial = 2.0 ** 16 / (2 * 64)
    assert [r["skipped_steps"] for r in fp16] == [0, 0, 0] and fp16[-1]["loss_scale"] == initial
    # the same steps in fp16 autocast: the losses agree to fp16's precision
    assert [r["loss"] for r in fp16] == pytest.approx([r["loss"] for r in fp32], rel=2e-2)
    ckpt = latest_checkpoint(tmp_path / "fp16" / "compress")
    assert torch.load(ckpt / "state.pt", weights_only=True)["running"]["grad_scaler"]["scale"] == initial

    # a resumed run continues with the saved scale: resume step 3 from step 2's checkpoint, its scale set to 8
    shutil.rmtree(ckpt)
    step2 = latest_checkpoint(tmp_path / "fp16" / "compress") / "state.pt"
    state = torch.load(step2, weights_only=True)
    state["running"]["grad_scaler"]["scale"] = 8.0
    torch.save(state, step2)
    meta = json.loads((step2.parent / "meta.json").read_text())
    meta["sha256"]["state.pt"] = hashlib.sha256(step2.read_bytes()).hexdigest()  # changed on purpose
    (step2.parent / "meta.json").write_text(json.dumps(meta))
    resumed = train(_config("compress", tiny_dir, tmp_path / "fp16", precision="fp16", resume=True, **kw),
                    progress=False)
    assert [(r["step"], r["loss_scale"]) for r in resumed] == [(3, 8.0)]


def test_fp16_training_that_overflows_at_every_step_stops(tiny_dir, tmp_path, monkeypatch):
    """A forward that overflows float16 (inf loss) no loss scale can save: the run stops, saying so, instead of
    skipping every step."""
    from llm2comp.training import trainer

    monkeypatch.setattr(trainer, "MAX_OVERFLOWED_STEPS", 3)
    cfg = _config("unsupervised", tiny_dir, tmp_path, precision="fp16", max_steps=5, batch_size=2)
    real = build_stage(cfg, _model(cfg), CPU).__class__.micro_step

    def overflowing(self, indices, epoch, scale):
        loss, tokens, weight = real(self, indices, epoch, lambda loss: scale(loss) * float("inf"))
        return float("inf"), tokens, weight

    monkeypatch.setattr(type(build_stage(cfg, _model(cfg), CPU)), "micro_step", overflowing)
    with pytest.raises(RuntimeError, match=r"fp16: the last 3 steps overflowed \(the loss scale is down to 8192; last "
                                           r"loss inf\): the forward itself overflows float16"):
        train(cfg, progress=False)


def test_fp32_training_loads_float32_weights_whatever_the_checkpoint(tiny_dir, tmp_path, monkeypatch):
    """A checkpoint stored in bf16 or fp16 (most are) would otherwise compute in its dtype under --precision fp32,
    with no loss scaler to catch an fp16 overflow."""
    from llm2comp.training import modeling

    real, dtypes = modeling.load_model, []

    def recording(cfg, dtype=None):
        dtypes.append(dtype)
        return real(cfg, dtype)

    monkeypatch.setattr(modeling, "load_model", recording)
    for chosen in ("fp32", "fp16"):
        train(_config("unsupervised", tiny_dir, tmp_path / chosen, precision=chosen, max_steps=1, batch_size=2),
              progress=False)
    assert dtypes == [torch.float32, None]
