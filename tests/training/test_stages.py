"""The three stages on a tiny random Llama: learning, the frozen decoder, GradCache, gradient
checkpointing and accumulation, logging, the output directory and resume."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm2comp import LLM2Comp
from llm2comp.tokenization import split_instruction
from llm2comp.training import load_config, modeling, train
from llm2comp.training.compress import make_compression_batch
from llm2comp.training.config import ConfigError
from llm2comp.training.rows import DataError
from llm2comp.training.stages import build_stage
from llm2comp.training.trainer import _check_output

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
        losses.append(stage.micro_step(indices, 0)[0])
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("stage, objective", [("compress", "kl"), ("compress", "nll"), ("compress", "reconstruct"),
                                              ("unsupervised", None), ("supervised", None)])
def test_loss_decreases_on_fixed_batch(stage, objective, tiny_dir, tmp_path, pairs_file):
    data = pairs_file if stage == "supervised" else LEE_BACKGROUND
    extra = {"objective": objective} if objective else {}
    cfg = _config(stage, tiny_dir, tmp_path, data=data, lora_dropout=0.0, **extra)
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


def test_encoder_reads_exactly_the_prefix_tokens_at_any_split(tiny_dir, tmp_path, monkeypatch):
    """Every split of a text with multi-byte characters (byte-level BPE cuts them into several tokens): the encoder
    reads BOS + the prefix's own tokens. Tokenizing the prefix's text again lost a character's first bytes when the
    split fell inside it."""
    from llm2comp.training import compress

    cfg = _config("compress", tiny_dir, tmp_path)
    model = _model(cfg)
    text = "the café owners said — 北京 today, 🙂 and naïve façades"
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode("utf-8")) // 3  # many byte tokens: splits fall inside characters
    bos = model.tokenize([""])["input_ids"][0, :1].tolist()
    for split in range(1, len(ids)):
        monkeypatch.setattr(compress, "split_point", lambda *args, s=split: s)
        batch = make_compression_batch(model, [text], objective="nll", min_split=1, max_length=128, seed=0, epoch=0,
                                       indices=[0])
        row = batch.encoder_inputs["input_ids"][0, :int(batch.encoder_inputs["seq_lens"][0])].tolist()
        assert row == bos + ids[:split] + model.memory_token_ids, split
        assert batch.targets[0].tolist() == ids[split:]


def test_kl_loss_is_fp32_under_autocast(tiny_dir, tmp_path):
    """Under autocast linear_kl_loss computes in bf16 but returns fp32: the stage-1 loss, which the micro-step
    multiplies by its token count, is fp32 as the other objectives' are."""
    from llm2comp.training.compress import compression_loss

    cfg = _config("compress", tiny_dir, tmp_path, lora_dropout=0.0)
    model = _model(cfg)
    texts = [" ".join(["the fire crews were called to the scene early on Monday"] * 3)] * 2
    batch = make_compression_batch(model, texts, objective="kl", min_split=5, max_length=64, seed=0, epoch=0,
                                   indices=[0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compression_loss(model, batch, "kl").dtype == torch.float32


@pytest.mark.parametrize("objective", ["kl", "nll"])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(objective, tiny_dir, tmp_path):
    """The decoder's layers run inside `frozen_decoder`; their recompute in backward must too."""
    grads = {}
    for checkpointing in (False, True):
        cfg = _config("compress", tiny_dir, tmp_path, objective=objective, lora_dropout=0.0)
        model = _model(cfg)
        _randomize_lora_b(model)  # adapters on vs off then differ in the recompute
        if checkpointing:
            modeling.enable_gradient_checkpointing(model)
        build_stage(cfg, model, CPU).micro_step([0, 5, 9, 13], 0)
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[False].keys() == grads[True].keys()
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_grad_cache_equals_plain_batch_on_the_model(tiny_dir, tmp_path, pairs_file):
    grads = {}
    for cached in (False, True):
        cfg = _config("supervised", tiny_dir, tmp_path, data=pairs_file, lora_dropout=0.0, grad_cache=cached,
                      chunk_size=3)
        model = _model(cfg)
        _randomize_lora_b(model)
        stage = build_stage(cfg, model, CPU)
        stage.micro_step([0, 1, 2, 3, 4], 0)
        grads[cached] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[False].keys() == grads[True].keys()
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("stage", ["compress", "unsupervised"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(stage, tiny_dir, tmp_path, monkeypatch):
    # the log window (2 steps) spans the checkpoint (step 3): its sum so far is part of the checkpoint
    kw = {"max_steps": 6, "save_every": 3, "log_every": 2, "grad_accum": 2, "batch_size": 2}
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
    # --save-every may change on resume (where and how often it writes, not what it computes)
    resumed = train(_config(stage, tiny_dir, tmp_path / "killed", resume=True, **{**kw, "save_every": 2}),
                    progress=False)
    assert [r["step"] for r in full] == [2, 4, 6] and [r["step"] for r in resumed] == [4, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[1:]], rel=1e-6, abs=1e-7)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full[1:]]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [
    lambda ckpt: _truncate(ckpt / "state.pt"),
    lambda ckpt: (ckpt / "state.pt").write_bytes(b""),
    lambda ckpt: _truncate(ckpt / "trainable.safetensors"),
    lambda ckpt: (ckpt / "meta.json").write_text("{garbage"),
    lambda ckpt: (ckpt / "state.pt").unlink(),
], ids=["truncated state", "empty state", "truncated weights", "garbage meta", "missing state"])
def test_resume_skips_a_damaged_newest_checkpoint(damage, tiny_dir, tmp_path, caplog):
    """The newest checkpoint fails its sha256 (or its meta.json does not read): a warning names it and the run
    resumes from the newest intact one."""
    kw = {"max_steps": 3, "save_every": 1, "batch_size": 2}
    full = train(_config("unsupervised", tiny_dir, tmp_path, **kw), progress=False)
    out = tmp_path / "unsupervised"
    damage(out / "checkpoints" / "step-3")
    with caplog.at_level("WARNING", logger="llm2comp.training.checkpoint"):
        resumed = train(_config("unsupervised", tiny_dir, tmp_path, resume=True, **kw), progress=False)
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-6)
    assert any(f"checkpoint {out / 'checkpoints' / 'step-3'} is damaged" in r.getMessage() for r in caplog.records)
    starts = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"start"' in line]
    assert starts[-1]["resumed_from"] == 2


def _disk_full_on(calls):
    """A writer that raises ENOSPC from its `calls`-th call on (the first is 1)."""
    import errno

    seen = []

    def write(*args, **kwargs):
        seen.append(1)
        if len(seen) >= calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    real = torch.save
    return write


def test_a_full_disk_while_checkpointing_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """The second checkpoint cannot be written: one line names it, its temporary files are gone and the first
    checkpoint is whole (a --resume continues from it)."""
    from llm2comp import cli
    from llm2comp.training import checkpoint

    out = tmp_path / "compress"
    monkeypatch.setattr(checkpoint.torch, "save", _disk_full_on(2))
    argv = ["train", "compress", "--model", str(tiny_dir), "--data", str(LEE_BACKGROUND), "--output", str(out),
            "--max-steps", "3", "--save-every", "1", "--batch-size", "2", "--max-length", "64"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("llm2comp")] == [
        f"llm2comp train compress: cannot write the checkpoint {out / 'checkpoints' / 'step-2'}: No space left on "
        "device"]  # beside the progress bar
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert checkpoint.latest_checkpoint(out) == out / "checkpoints" / "step-1"


def test_a_full_disk_while_saving_the_model_is_one_line(tiny_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    cfg = _config("unsupervised", tiny_dir, tmp_path, max_steps=1)
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", _disk_full_on(1))
    with pytest.raises(OSError, match=re.escape(f"cannot write the model to {cfg.output}: No space left on device")):
        train(cfg, progress=False)
    assert sorted(p.name for p in Path(cfg.output).iterdir()) == [".llm2comp.lock", "checkpoints", "log.jsonl"]


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


def test_model_options_a_saved_model_keeps_are_named_in_a_warning(tiny_dir, tmp_path, caplog):
    first = _config("compress", tiny_dir, tmp_path, max_steps=1)
    train(first, progress=False)
    with caplog.at_level("WARNING"):
        modeling.load_model(_config("unsupervised", tiny_dir, tmp_path, model=first.output))
    assert not caplog.records  # the defaults, which the saved model has
    with caplog.at_level("WARNING"):
        model = modeling.load_model(_config("unsupervised", tiny_dir, tmp_path, model=first.output, lora_r=4,
                                            memory_tokens=2))
    assert model.num_memory_tokens == 8
    assert "keeps its own settings, so these apply to new models only: --memory-tokens 2 (the model has 8); " \
           "--lora-r 4 (the model has 16)" in caplog.text


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


def test_gradient_accumulation_weighs_micro_batches_by_their_tokens(tiny_dir, tmp_path):
    """Stage 1: two micro-batches of 2 texts train as one batch of the same 4 (DDP weighs ranks alike)."""
    kw = {"max_steps": 3, "lora_dropout": 0.0, "lr": 1e-3}
    accumulated = train(_config("compress", tiny_dir, tmp_path / "accum", batch_size=2, grad_accum=2, **kw),
                        progress=False)
    whole = train(_config("compress", tiny_dir, tmp_path / "whole", batch_size=4, **kw), progress=False)
    assert [r["loss"] for r in accumulated] == pytest.approx([r["loss"] for r in whole], rel=1e-5, abs=1e-7)


def test_examples_left_out_of_the_last_step_are_counted(tiny_dir, tmp_path, lee_texts):
    data = tmp_path / "ten.txt"
    data.write_text("\n".join(lee_texts[:10]) + "\n")
    cfg = _config("compress", tiny_dir, tmp_path, data=data, batch_size=3, grad_accum=2)
    train(cfg, progress=False)
    start = json.loads((Path(cfg.output) / "log.jsonl").read_text().splitlines()[0])
    # 3 batches of 3 per epoch (1 example left), one step of 2 batches: the third batch is left
    assert (start["total_steps"], start["dropped_per_epoch_incomplete_batch"],
            start["dropped_at_end_incomplete_step"]) == (1, 1, 3)


def test_log_every_logs_the_mean_loss_of_its_window(tiny_dir, tmp_path):
    every_step = train(_config("unsupervised", tiny_dir, tmp_path / "a", max_steps=3), progress=False)
    windowed = train(_config("unsupervised", tiny_dir, tmp_path / "b", max_steps=3, log_every=3), progress=False)
    assert [r["step"] for r in windowed] == [3]
    assert windowed[0]["loss"] == pytest.approx(sum(r["loss"] for r in every_step) / 3, rel=1e-6)


@pytest.mark.parametrize("stage, max_length, message", [
    ("unsupervised", 9, "--max-length 9 is too small: a row holds the BOS, 8 memory tokens (--memory-tokens, or "
                        "the loaded model's) and at least 1 text token, so it needs >= 10"),
    ("compress", 28, "--max-length 28 is too small: a row holds the BOS, 8 memory tokens (--memory-tokens, or "
                     "the loaded model's) and 20 text tokens to split (2 x --min-split 10), so it needs >= 29"),
    ("compress", 513, "--max-length 513 exceeds the model's 512 positions (max_position_embeddings)"),
])
def test_max_length_must_leave_room_after_the_memory_tokens(stage, max_length, message, tiny_dir, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(_config(stage, tiny_dir, tmp_path, max_length=max_length), progress=False)
    assert str(info.value) == message


def test_an_instruction_leaving_no_room_for_text_fails_at_load(tiny_dir, tmp_path, lee_texts):
    """Found when the stage reads its file, naming the line, not when a batch first holds the row (hours in)."""
    data = tmp_path / "long.jsonl"
    rows = [{"query": t[:40], "positive": t[40:200], "negatives": []} for t in lee_texts[:6]]
    rows[4]["instruction"] = "Retrieve the news article that this headline sentence was written for: " * 3
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config("supervised", tiny_dir, tmp_path, data=data, max_length=24, num_negatives=0)
    with pytest.raises(DataError, match=r"long\.jsonl:5: the instruction leaves no text token in --max-length 24 "
                                        r"\(max_length=24 leaves no room for text after \d+ prefix and 8 memory "
                                        r"tokens\)"):
        build_stage(cfg, _model(cfg), CPU)
    rows[4]["instruction"] = "Retrieve the article: "
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_stage(cfg, _model(cfg), CPU).micro_step([3, 4], 0)


def test_the_instruction_check_reads_every_row(tiny_dir, tmp_path):
    """An instruction's tokens depend on the text after it (they are tokenized together): a query starting with a
    space gives "Query: " one token more, so a row the first one of its instruction fits beside may not fit."""
    data = tmp_path / "spaces.jsonl"
    queries = ["fire crews", " fire crews"]
    data.write_text("".join(json.dumps({"query": q, "positive": "the fire", "negatives": [], "instruction": "Query: "})
                            + "\n" for q in queries))
    cfg = _config("supervised", tiny_dir, tmp_path, data=data, num_negatives=0)
    model = _model(cfg)
    first, second = (len(head) for head, _ in split_instruction(model.tokenizer, queries, "Query: "))
    assert second > first
    cfg.max_length = 1 + first + model.num_memory_tokens + 1  # BOS, instruction, one text token, memory tokens
    with pytest.raises(DataError, match=r"spaces\.jsonl:2: the instruction leaves no text token"):
        build_stage(cfg, model, CPU)


def test_resume_refuses_data_that_gives_other_examples(tiny_dir, tmp_path, lee_texts):
    data = tmp_path / "d.txt"
    data.write_text("\n".join(lee_texts[:8]) + "\n")
    kw = {"data": data, "batch_size": 2, "max_steps": 2, "save_every": 1}
    train(_config("unsupervised", tiny_dir, tmp_path, **kw), progress=False)
    data.write_text("\n".join(lee_texts[:8] + [lee_texts[0]]) + "\n")  # a repeat, kept once: still 8 examples
    train(_config("unsupervised", tiny_dir, tmp_path, resume=True, **{**kw, "max_steps": 2}), progress=False)
    data.write_text("\n".join(lee_texts[:9]) + "\n")
    with pytest.raises(DataError, match="gives 9 examples here but 8 in the run being resumed"):
        train(_config("unsupervised", tiny_dir, tmp_path, resume=True, **kw), progress=False)


def test_supervised_stage_merges_repeated_doc_texts(tiny_dir, tmp_path, pairs_file, monkeypatch):
    """The stage hands the loss its docs' text keys (positives, then negatives), so a text repeated in the batch
    is one column (tested in test_contrastive.py)."""
    from llm2comp.training import stages
    from llm2comp.training.contrastive import text_keys

    seen, in_batch_loss = [], stages.in_batch_loss

    def loss(queries, docs, temperature, doc_keys=None):
        seen.append(doc_keys)
        return in_batch_loss(queries, docs, temperature, doc_keys)

    cfg = _config("supervised", tiny_dir, tmp_path, data=pairs_file, lora_dropout=0.0)
    stage = build_stage(cfg, _model(cfg), CPU)
    monkeypatch.setattr(stages, "in_batch_loss", loss)
    stage.micro_step([0, 1], 0)
    rows = [stage.rows[0], stage.rows[1]]
    expected = text_keys([r.positive for r in rows] + [n for r in rows for n in r.negatives])
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_simcse_keeps_one_copy_of_a_repeated_text(tiny_dir, tmp_path, lee_texts):
    """Two copies of a text in one SimCSE batch are each other's negatives, a loss floor no update lowers: the
    stage keeps the first copy and counts the rest in the log."""
    data = tmp_path / "repeated.txt"
    data.write_text("\n".join([lee_texts[0], lee_texts[1], lee_texts[0], lee_texts[2], lee_texts[1]]) + "\n")
    cfg = _config("unsupervised", tiny_dir, tmp_path, data=data, batch_size=3, max_steps=1)
    stage = build_stage(cfg, _model(cfg), CPU)
    assert [(r.line, r.text) for r in stage.rows] == [(1, lee_texts[0]), (2, lee_texts[1]), (4, lee_texts[2])]
    train(cfg, progress=False)
    start = json.loads((Path(cfg.output) / "log.jsonl").read_text().splitlines()[0])
    assert start["examples"] == 3 and start["skipped_rows"]["repeated texts"] == 2


def test_saved_config_records_the_lora_dropout_used(tiny_dir, tmp_path):
    model = _model(_config("compress", tiny_dir, tmp_path))  # built with the compress default, 0.05
    cfg = _config("unsupervised", tiny_dir, tmp_path, max_steps=1, lora_dropout=0.3)
    train(cfg, model=model, progress=False)
    assert json.loads((Path(cfg.output) / "llm2comp_config.json").read_text())["lora"]["dropout"] == 0.3


@pytest.fixture
def no_model(monkeypatch):
    """The output checks come before the model is loaded: loading it fails the test."""
    def load_model(cfg, *args):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(modeling, "load_model", load_model)


@pytest.mark.parametrize("old_run", ["log.jsonl", "checkpoints", "llm2comp_config.json"])
def test_output_holding_a_run_needs_resume_or_overwrite(old_run, tiny_dir, tmp_path, no_model):
    cfg = _config("compress", tiny_dir, tmp_path)
    out = Path(cfg.output)
    out.mkdir()
    (out / old_run).mkdir() if old_run == "checkpoints" else (out / old_run).touch()
    with pytest.raises(ConfigError, match=rf"--output {out} holds a run \({old_run}\): --resume continues it, "
                                          "--overwrite starts afresh"):
        train(cfg, progress=False)


@pytest.mark.parametrize("flags", [{}, {"overwrite": True}, {"resume": True}])
def test_output_holding_other_files_is_refused(flags, tiny_dir, tmp_path, no_model):
    """A directory of the user's own (not a run) is never written into, --overwrite or not: a run would replace
    its README.md, modules.json and adapter_config.json."""
    cfg = _config("compress", tiny_dir, tmp_path, **flags)
    out = Path(cfg.output)
    out.mkdir()
    for name in ("README.md", "modules.json", "adapter_config.json"):
        (out / name).write_text("the user's own\n")
    with pytest.raises(FileExistsError, match=re.escape(f"--output {out} exists and is not an empty directory "
                                                        "(README.md, adapter_config.json, modules.json)")):
        train(cfg, progress=False)
    assert {p.name: p.read_text() for p in out.iterdir() if not p.name.startswith(".")} == {
        name: "the user's own\n" for name in ("README.md", "modules.json", "adapter_config.json")}


def test_the_lock_file_a_killed_run_left_is_not_a_run_nor_a_file(tiny_dir, tmp_path, no_model):
    cfg = _config("compress", tiny_dir, tmp_path)
    Path(cfg.output).mkdir()
    (Path(cfg.output) / ".llm2comp.lock").touch()
    (Path(cfg.output) / ".llm2comp.pid").write_text("12345\n")
    with pytest.raises(AssertionError, match="the model was loaded"):  # past every output check
        train(cfg, progress=False)


def test_a_failed_run_leaves_no_output_directory_it_created(tiny_dir, tmp_path):
    cfg = _config("compress", tiny_dir, tmp_path, data=tmp_path / "missing.txt")
    with pytest.raises(DataError):
        train(cfg, progress=False)
    assert not Path(cfg.output).exists()


_HOLD = ("import sys, time; from pathlib import Path; from llm2comp.outputs import exclusive\n"
         "with exclusive(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)")


def test_a_second_run_on_one_output_fails_at_once_naming_the_first(tiny_dir, tmp_path, capsys, no_model):
    """Another process holds --output: a run, a resumed one or an overwriting one fails at once with its PID and
    leaves its checkpoints alone; once the holder is killed, the OS has released the lock."""
    import subprocess
    import sys

    from llm2comp import cli

    cfg = _config("compress", tiny_dir, tmp_path)
    out = Path(cfg.output)
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        message = f"{out} is in use by another llm2comp process (PID {holder.pid})"
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(BlockingIOError, match=re.escape(message)):
                train(_config("compress", tiny_dir, tmp_path, **flags), progress=False)
        argv = ["train", "compress", "--model", str(tiny_dir), "--data", str(LEE_BACKGROUND), "--output", str(out),
                "--overwrite"]
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == f"llm2comp train compress: {message}: wait for it to end, or give " \
                                          "another directory\n"
        assert (out / "checkpoints" / "step-1").is_dir()
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(AssertionError, match="the model was loaded"):
        train(_config("compress", tiny_dir, tmp_path, overwrite=True), progress=False)


def test_output_that_is_a_file_fails_before_the_model_loads(tiny_dir, tmp_path, no_model):
    cfg = _config("compress", tiny_dir, tmp_path)
    Path(cfg.output).write_text("not a directory")
    with pytest.raises(ConfigError, match=f"--output {cfg.output} is a file, not a directory"):
        train(cfg, progress=False)


@pytest.mark.parametrize("stage, data, message", [
    ("compress", "missing.txt", "missing.txt: no such file"),
    ("compress", ".", ": a directory, not a data file"),
    ("supervised", "corpus.txt", "corpus.txt: supervised data must be a .jsonl file"),
    ("unsupervised", "bad.jsonl", "bad.jsonl:2: missing field 'text'"),
])
def test_data_errors_come_before_the_model_loads(stage, data, message, tiny_dir, tmp_path, no_model):
    (tmp_path / "corpus.txt").write_text("a text\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a text"}\n{"query": "no text field"}\n')
    with pytest.raises(DataError, match=re.escape(message)):
        train(_config(stage, tiny_dir, tmp_path, data=tmp_path / data), progress=False)


def test_data_too_small_for_one_batch_names_the_file(tiny_dir, tmp_path):
    data = tmp_path / "three.txt"
    data.write_text("one text\nanother text\na third text\n")
    with pytest.raises(DataError, match=re.escape(f"{data}: 3 examples cannot fill one batch of 4 (--batch-size 4 x "
                                                  "1 processes)")):
        train(_config("unsupervised", tiny_dir, tmp_path, data=data), progress=False)


def test_overwrite_deletes_the_old_checkpoints_and_log(tiny_dir, tmp_path):
    cfg = _config("compress", tiny_dir, tmp_path, max_steps=1, overwrite=True)
    out = Path(cfg.output)
    (out / "checkpoints" / "step-9").mkdir(parents=True)
    (out / "log.jsonl").write_text('{"event": "start", "stage": "old"}\n')
    (out / "notes.txt").write_text("the user's own\n")
    train(cfg, progress=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    assert (out / "notes.txt").read_text() == "the user's own\n"  # only what a run wrote is replaced
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r.get("event", "step") for r in log] == ["start", "step", "end"] and log[0]["stage"] == "compress"


@pytest.mark.parametrize("option, saved, message", [
    ("stage", "unsupervised", "--resume: the stage is 'compress' here but 'unsupervised' in the run being resumed"),
    ("data", "other.txt", "--resume: --data is '{data}' here but 'other.txt' in the run being resumed"),
    ("lora_r", 8, "--resume: --lora-r is 16 here but 8 in the run being resumed"),
    ("grad_accum", 2, "--resume: --grad-accum is 1 here but 2 in the run being resumed"),
    ("lr", 1e-5, "--resume: --lr is 0.002 here but 1e-05 in the run being resumed"),
    ("max_steps", 4, "--resume: --max-steps is 0 here but 4 in the run being resumed"),
    ("min_split", 5, "--resume: --min-split is 10 here but 5 in the run being resumed"),
    ("precision", "bf16", "--resume: --precision is 'auto' here but 'bf16' in the run being resumed"),
    ("batch_size", 2, "--resume: the global batch (--batch-size x processes) is 4 x 1 here but 2 x ? in the run "
                      "being resumed"),  # a checkpoint that predates world_size in meta.json
])
def test_resume_refuses_a_run_of_other_options(option, saved, message, tiny_dir, tmp_path, no_model):
    cfg = _config("compress", tiny_dir, tmp_path, resume=True)
    ckpt = Path(cfg.output) / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "config": {**cfg.to_dict(), option: saved}}))
    with pytest.raises(ConfigError) as info:
        train(cfg, progress=False)
    assert message.format(data=cfg.data) in str(info.value) and str(ckpt / "meta.json") in str(info.value)


@pytest.mark.parametrize("changed, world, dropout, warned", [
    ({"chunk_size": 2}, 1, 0.1, "--grad-cache/--chunk-size changed since step-2"),
    ({"grad_cache": False}, 1, 0.1, "--grad-cache/--chunk-size changed"),
    ({}, 2, 0.1, "the number of processes changed"),
    ({"chunk_size": 2}, 1, 0.0, None),  # no dropout: the same computation however the batch is cut
    ({"save_every": 7}, 1, 0.1, None),
])
def test_resume_warns_that_a_recut_batch_draws_other_dropout_masks(changed, world, dropout, warned, tiny_dir,
                                                                    tmp_path, caplog):
    cfg = _config("supervised", tiny_dir, tmp_path, resume=True, grad_cache=True, chunk_size=4, batch_size=4,
                  lora_dropout=dropout)
    ckpt = Path(cfg.output) / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    saved = {**cfg.to_dict(), **changed, "batch_size": cfg.batch_size * world}
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "config": saved, "world_size": 1}))
    with caplog.at_level("WARNING", logger="llm2comp.training.trainer"):
        assert _check_output(cfg, world) == ckpt
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if warned and warned in m and "not bit for bit" in m] if warned else not messages


def test_resume_takes_another_spelling_of_the_same_data_and_model_paths(tiny_dir, tmp_path):
    cfg = _config("compress", tiny_dir, tmp_path, resume=True)
    ckpt = Path(cfg.output) / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    saved = {**cfg.to_dict(), "data": os.path.relpath(cfg.data), "model": f"{cfg.model}/."}
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "config": saved, "world_size": 1}))
    assert saved["data"] != cfg.data and _check_output(cfg, 1) == ckpt
    (ckpt / "meta.json").write_text(json.dumps({"step": 2, "config": {**saved, "data": str(tmp_path / "gone.txt")},
                                                "world_size": 1}))
    with pytest.raises(ConfigError, match="--resume: --data is"):
        _check_output(cfg, 1)


def test_resume_of_a_run_killed_while_saving_its_model_writes_it(tiny_dir, tmp_path):
    """The last checkpoint is written before the final model: a run killed in between resumes to the save alone."""
    cfg = _config("unsupervised", tiny_dir, tmp_path, max_steps=2)
    train(cfg, progress=False)
    out = Path(cfg.output)
    for name in ("adapter_model.safetensors", "llm2comp_config.json"):
        (out / name).unlink()
    assert train(_config("unsupervised", tiny_dir, tmp_path, max_steps=2, resume=True), progress=False) == []
    assert LLM2Comp.from_pretrained(str(out)).num_memory_tokens == cfg.memory_tokens
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e.get("event", "step") for e in events] == ["start", "step", "step", "end", "start", "end"]


def test_stage_two_trains_a_fresh_lora_on_the_folded_one_with_memory_rows_frozen(tiny_dir, tmp_path):
    """The paper's hand-off (the contrastive stages' defaults): stage 1's LoRA folded into the weights, a fresh
    LoRA trained, the memory rows as stage 1 left them; the saved result reloads to what was trained. Without
    the options, one LoRA and the memory rows train on."""
    first = _config("compress", tiny_dir, tmp_path, max_steps=2)
    train(first, progress=False)
    stage1 = LLM2Comp.from_pretrained(first.output)
    rows = {n: p.detach().clone() for n, p in stage1.named_parameters() if modeling.MEMORY_ROWS_PARAM in n}
    second = _config("unsupervised", tiny_dir, tmp_path, model=first.output, max_steps=2)
    assert (second.fresh_lora, second.freeze_memory, second.attention_dropout) == (True, True, 0.2)
    train(second, progress=False)
    out = LLM2Comp.from_pretrained(second.output)
    assert out.merged_lora and (Path(second.output) / "merged_lora.safetensors").is_file()
    for n, p in out.named_parameters():
        if n in rows:
            torch.testing.assert_close(p, rows[n], msg=n)
    texts = ["Fires burned near Sydney.", "Rain."]
    model = modeling.load_model(second)  # stage 1 again, then the hand-off and stage 2's saved weights
    modeling.prepare_for_stage(model, second)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora" in n) > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if modeling.MEMORY_ROWS_PARAM in n)
    third = _config("unsupervised", tiny_dir, tmp_path / "plain", model=first.output, max_steps=2,
                    fresh_lora=False, freeze_memory=False)
    train(third, progress=False)
    plain = LLM2Comp.from_pretrained(third.output)
    assert not plain.merged_lora
    assert any(not torch.equal(p, rows[n]) for n, p in plain.named_parameters() if n in rows)
    assert not torch.allclose(torch.as_tensor(plain.encode(texts)), torch.as_tensor(out.encode(texts)))


def test_frozen_decoder_runs_without_attention_dropout(tiny_dir, tmp_path):
    """Stage 1's teacher and decoder are the original LLM: no attention dropout inside `frozen_decoder`, even in
    training mode with the option on; it is back on after the block."""
    cfg = _config("compress", tiny_dir, tmp_path, attention_dropout=0.3)
    model = _model(cfg)
    modeling.prepare_for_stage(model, cfg)
    batch = model.tokenize(["Fires burned across the state for days."])
    with modeling.frozen_decoder(model):
        runs = [model.hidden_states(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1])
    assert model.model.get_base_model().config.attention_dropout == 0.3
    encoder = [model.hidden_states(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
               for _ in range(2)]
    assert not torch.allclose(encoder[0], encoder[1])  # the encoder's forward draws masks
