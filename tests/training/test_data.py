"""Training data files, config, schedule and checkpoint files (no model needed)."""

import json

import pytest
import torch

from llm2comp.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llm2comp.training.config import load_config
from llm2comp.training.data import BatchOrder, DataError, read_pairs, read_texts, split_point
from llm2comp.training.optim import lr_lambda


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_texts_txt_and_jsonl(tmp_path):
    rows, skipped = read_texts(_write(tmp_path, "a.txt", ["first doc", "", "second doc"]))
    assert [(r.line, r.text) for r in rows] == [(1, "first doc"), (3, "second doc")] and skipped == 1
    rows, skipped = read_texts(_write(tmp_path, "a.jsonl", [json.dumps({"text": "x y"}), json.dumps({"text": "z"})]))
    assert [r.text for r in rows] == ["x y", "z"] and skipped == 0


@pytest.mark.parametrize("name, lines, match", [
    ("empty.txt", [""], "empty.txt: the file is empty"),
    ("bad.jsonl", ['{"text": "ok"}', '{"txt": "no"}'], r"bad.jsonl:2: missing field 'text'"),
    ("bad.jsonl", ['{"text": "ok"}', "{not json"], r"bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", ['{"text": ""}'], r"bad.jsonl:1: field 'text' must be a non-empty string"),
])
def test_read_texts_errors_name_file_and_line(tmp_path, name, lines, match):
    with pytest.raises(DataError, match=match):
        read_texts(_write(tmp_path, name, lines))


def test_read_texts_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_texts(tmp_path / "nope.txt")


def test_read_pairs(tmp_path):
    rows = [{"query": "q1", "positive": "p1", "negatives": ["n1", "n2"], "instruction": "Find"},
            {"query": "q2", "positive": "p2", "negatives": ["m1"]}]
    got, _ = read_pairs(_write(tmp_path, "s.jsonl", [json.dumps(r) for r in rows]), num_negatives=1)
    assert got[0].negatives == ("n1",) and got[0].instruction == "Find" and got[1].instruction is None
    with pytest.raises(DataError, match=r"s.jsonl:2: 1 negatives, but --num-negatives is 2"):
        read_pairs(tmp_path / "s.jsonl", num_negatives=2)
    bad = _write(tmp_path, "b.jsonl", [json.dumps({"query": "q", "negatives": []})])
    with pytest.raises(DataError, match=r"b.jsonl:1: missing field 'positive'"):
        read_pairs(bad, num_negatives=0)


def test_split_point_deterministic_and_in_range():
    points = [split_point(30, 10, 0, 1, i) for i in range(200)]
    assert min(points) == 10 and max(points) == 20
    assert points == [split_point(30, 10, 0, 1, i) for i in range(200)]


def test_batch_order_ranks_partition_the_single_process_batch():
    single = BatchOrder(10, 4, seed=3)
    ranks = [BatchOrder(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for position in range(5):  # crosses an epoch boundary (2 batches per epoch)
        epoch, whole = single.batch(position)
        assert epoch == position // 2
        assert ranks[0].batch(position)[1] + ranks[1].batch(position)[1] == whole
    with pytest.raises(DataError, match="cannot fill one batch"):
        BatchOrder(3, 4, seed=0)


def test_config_precedence_and_stage_defaults(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('data = "d.txt"\noutput = "out"\nbatch-size = 7\nlr = 3e-4\n')
    cfg = load_config("unsupervised", toml, lr=2e-5)
    assert (cfg.batch_size, cfg.lr, cfg.lora_dropout, cfg.temperature, cfg.memory_tokens) == (7, 2e-5, 0.2, 0.05, 8)
    assert load_config("compress", toml, lr=1e-4).objective == "kl"
    assert load_config("supervised", data="d", output="o").lr == 1e-5
    toml.write_text('data = "d"\noutput = "o"\nbatchsize = 3\n')
    with pytest.raises(ValueError, match="unknown options"):
        load_config("compress", toml)
    with pytest.raises(ValueError, match="objective must be one of"):
        load_config("compress", data="d", output="o", objective="mse")


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule(schedule):
    f = lr_lambda(schedule, warmup=4, total=20)
    values = [f(s) for s in range(20)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and values[4] == 1.0
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert f(20) == (1.0 if schedule == "constant" else pytest.approx(0.0))


def test_checkpoint_roundtrip_keeps_newest(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("linear", 1, 10))
    for step in (1, 2, 3):
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        sched.step()
        save_checkpoint(tmp_path, model, opt, sched, step, {"seed": 0}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    expected = [p.detach().clone() for p in model.parameters()]
    frozen_before = model[0].weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt2 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lr_lambda("linear", 1, 10))
    assert load_checkpoint(latest_checkpoint(tmp_path), model, opt2, sched2) == 3
    torch.testing.assert_close(model[1].weight, expected[2])
    assert not model[0].weight.any() and frozen_before.any()  # frozen params are not in the checkpoint
    assert sched2.last_epoch == 3 and opt2.state_dict()["state"][0]["step"] == 3
