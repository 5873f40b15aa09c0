"""The three stages on a tiny random Llama: learning, the frozen decoder, GradCache, resume."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm2comp import LLM2Comp
from llm2comp.training import load_config, modeling, train
from llm2comp.training.compress import make_compression_batch
from llm2comp.training.stages import build_stage

from .conftest import LEE_BACKGROUND

CPU = torch.device("cpu")


def _config(stage, tiny_dir, tmp_path, data=LEE_BACKGROUND, **kw):
    opts = {"model": str(tiny_dir), "data": str(data), "output": str(tmp_path / stage), "max_length": 64,
            "batch_size": 4, "attention_backend": "torch", "lr": 2e-3, **kw}
    return load_config(stage, **opts)


def _model(cfg):
    torch.manual_seed(cfg.seed)
    model = modeling.load_model(cfg)
    modeling.set_lora_dropout(model, cfg.lora_dropout)
    return model.train()


def _randomize_lora_b(model):
    """A fresh adapter has LoRA B = 0, so LoRA dropout adds no noise; stage 2 starts from a trained one."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)


def _fit_fixed_batch(stage, indices, steps, lr):
    params = [p for p in stage.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        losses.append(stage.micro_step(indices, 0, 1.0)[0])
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("stage, objective", [("compress", "kl"), ("compress", "nll"), ("compress", "reconstruct"),
                                              ("unsupervised", "kl"), ("supervised", "kl")])
def test_loss_decreases_on_fixed_batch(stage, objective, tiny_dir, tmp_path, pairs_file):
    data = pairs_file if stage == "supervised" else LEE_BACKGROUND
    cfg = _config(stage, tiny_dir, tmp_path, data=data, objective=objective, lora_dropout=0.0)
    model = _model(cfg)
    if stage != "compress":
        _randomize_lora_b(model)
    losses = _fit_fixed_batch(build_stage(cfg, model, CPU), [0, 5, 9, 13], steps=25, lr=2e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


def test_decoder_is_the_frozen_original_model(tiny_dir, tmp_path):
    cfg = _config("compress", tiny_dir, tmp_path, max_steps=4, lr=1e-2)
    model = _model(cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(cfg, model=model, progress=False)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters did train, so disabling them matters
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    model.eval()
    batch = make_compression_batch(model, ["The fire crews were called to the scene early on Monday morning after "
                                           "reports of smoke near the houses in the northern suburbs of Sydney.",
                                           "A short text that is still long enough to split in two halves for "
                                           "the test of the decoder."],
                                   objective="kl", min_split=5, max_length=64, seed=0, epoch=0, indices=[0, 1])
    ids, mask = batch.teacher_ids, batch.teacher_mask
    embeds = torch.randn(*ids.shape, base.config.hidden_size)
    with torch.no_grad():
        expected_ids = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected_embeds = base.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        with modeling.frozen_decoder(model):
            got_ids = model.hidden_states(input_ids=ids, attention_mask=mask)
            got_embeds = model.hidden_states(inputs_embeds=embeds, attention_mask=mask)
        encoder_view = model.hidden_states(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got_ids[valid], expected_ids[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_embeds[valid], expected_embeds[valid], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(encoder_view[valid], expected_ids[valid], atol=1e-3)  # outside: the encoder


def test_grad_cache_equals_plain_batch_on_the_model(tiny_dir, tmp_path, pairs_file):
    grads = {}
    for cached in (False, True):
        cfg = _config("supervised", tiny_dir, tmp_path, data=pairs_file, lora_dropout=0.0, grad_cache=cached,
                      chunk_size=3)
        model = _model(cfg)
        _randomize_lora_b(model)
        stage = build_stage(cfg, model, CPU)
        stage.micro_step([0, 1, 2, 3, 4], 0, 1.0)
        grads[cached] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[False].keys() == grads[True].keys()
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("stage", ["compress", "unsupervised"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(stage, tiny_dir, tmp_path, monkeypatch):
    kw = {"max_steps": 6, "save_every": 3, "grad_accum": 2, "batch_size": 2}
    full = train(_config(stage, tiny_dir, tmp_path / "full", **kw), progress=False)

    cfg = _config(stage, tiny_dir, tmp_path / "killed", **kw)
    calls = {"n": 0}
    real = build_stage(cfg, _model(cfg), CPU).__class__.micro_step

    def dying(self, *args):
        calls["n"] += 1
        if calls["n"] == 9:  # step 5 of 6, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(type(build_stage(cfg, _model(cfg), CPU)), "micro_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    monkeypatch.undo()
    resumed = train(_config(stage, tiny_dir, tmp_path / "killed", resume=True, **kw), progress=False)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[3:]], rel=1e-6, abs=1e-7)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full[3:]]


def test_stage_chaining_loads_previous_output(tiny_dir, tmp_path):
    first = _config("compress", tiny_dir, tmp_path, max_steps=2)
    train(first, progress=False)
    trained = LLM2Comp.from_pretrained(first.output)
    second = _config("unsupervised", tiny_dir, tmp_path, model=first.output, max_steps=1)
    model = modeling.load_model(second)
    trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    loaded = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == loaded.keys()
    for n, p in trainable.items():
        torch.testing.assert_close(loaded[n], p, msg=n)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_chunked_cross_entropy_equals_the_full_logits_one(monkeypatch):
    """nll / reconstruct: chunks of 3 rows (the last one partial) give the loss and gradients of one matmul."""
    from llm2comp.training import compress

    monkeypatch.setattr(compress, "CE_CHUNK_ROWS", 3)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (10,), generator=g)
    got = compress._chunked_cross_entropy(hidden, weight, targets)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight))):
        torch.testing.assert_close(a, b)
