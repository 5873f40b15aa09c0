"""Training data files, config, schedule and checkpoint files (no model needed)."""

import json

import pytest
import torch

from llm2comp.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llm2comp.training.config import ConfigError, load_config
from llm2comp.training.optim import lr_lambda
from llm2comp.training.rows import BatchOrder, DataError, read_pairs, read_texts, split_point


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


def test_read_texts_needs_utf8_and_tolerates_a_bom(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufefffirst doc\nsecond doc\n".encode())
    assert [r.text for r in read_texts(tmp_path / "bom.txt")[0]] == ["first doc", "second doc"]
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"text": "x"}\n')
    assert [r.text for r in read_texts(tmp_path / "bom.jsonl")[0]] == ["x"]
    (tmp_path / "latin1.txt").write_bytes("first doc\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8 text \(byte 0xe9"):
        read_texts(tmp_path / "latin1.txt")


def test_only_newline_ends_a_line(tmp_path):
    (tmp_path / "seps.txt").write_text("one\u2028still one\x1cstill one\r\ntwo\n", encoding="utf-8")
    assert [r.text for r in read_texts(tmp_path / "seps.txt")[0]] == ["one\u2028still one\x1cstill one", "two"]


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
    assert (cfg.batch_size, cfg.lr, cfg.lora_dropout, cfg.temperature, cfg.memory_tokens) == (7, 2e-5, 0.05, 0.05, 8)
    assert (cfg.attention_dropout, cfg.fresh_lora, cfg.freeze_memory) == (0.2, True, True)  # the paper's stage 2
    compress = load_config("compress", toml, lr=1e-4)
    assert (compress.objective, compress.attention_dropout, compress.fresh_lora, compress.freeze_memory) == (
        "kl", 0.0, False, False)
    assert load_config("supervised", data="d", output="o").lr == 1e-4
    toml.write_text('data = "d"\noutput = "o"\nbatchsize = 3\n')
    with pytest.raises(ValueError, match="unknown options"):
        load_config("compress", toml)
    with pytest.raises(ValueError, match="objective must be one of"):
        load_config("compress", data="d", output="o", objective="mse")


@pytest.mark.parametrize("line, message", [
    ('batch-size = "7"', "batch-size must be an integer, got '7'"),
    ("epochs = true", "epochs must be an integer, got True"),
    ('lr = "1e-4"', "lr must be a number, got '1e-4'"),
    ("skip_short = 1", "skip_short must be true or false, got 1"),
    ("model = 3", "model must be a string, got 3"),
    ('stage = "supervised"', "'stage' cannot be set in a config file"),
    ('data = "unclosed', "not valid TOML"),
])
def test_config_file_errors_name_the_file_and_key(tmp_path, line, message):
    toml = tmp_path / "c.toml"
    toml.write_text(f'output = "o"\n{line}\n')
    with pytest.raises(ConfigError) as info:
        load_config("compress", toml, data="d")
    assert str(toml) in str(info.value) and message in str(info.value), info.value


@pytest.mark.parametrize("options, message", [
    ({"max_steps": -1}, "--max-steps must be >= 0, got -1"),
    ({"num_negatives": -2, "stage": "supervised"}, "--num-negatives must be >= 0, got -2"),
    ({"max_grad_norm": -1.0}, "--max-grad-norm must be >= 0, got -1.0"),
    ({"weight_decay": -0.1}, "--weight-decay must be >= 0, got -0.1"),
    ({"lora_alpha": 0}, "--lora-alpha must be >= 1, got 0"),
    ({"lr": float("nan")}, "--lr must be a finite number, got nan"),
    ({"temperature": 0.0, "stage": "unsupervised"}, "--temperature must be > 0, got 0.0"),
    ({"warmup_ratio": 1.0}, "--warmup-ratio must be in [0, 1), got 1.0"),
    ({"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other"),
])
def test_option_ranges_are_checked_at_startup(options, message):
    options = dict(options)
    with pytest.raises(ConfigError) as info:
        load_config(options.pop("stage", "compress"), data="d", output="o", **options)
    assert message in str(info.value)


def test_options_of_other_stages_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="^--objective applies to the compress stage only, not to supervised$"):
        load_config("supervised", data="d", output="o", objective="nll")
    toml = tmp_path / "c.toml"
    toml.write_text('data = "d"\noutput = "o"\ntemperature = 0.1\n')
    with pytest.raises(ConfigError, match=f"--temperature applies to the unsupervised and supervised stage only, "
                                          f"not to compress \\(set in {toml}\\)"):
        load_config("compress", toml)


def test_missing_data_and_output_are_named():
    with pytest.raises(ConfigError, match="--data and --output required"):
        load_config("compress")


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
    assert load_checkpoint(latest_checkpoint(tmp_path), model, opt2, sched2) == (3, {})
    torch.testing.assert_close(model[1].weight, expected[2])
    assert not model[0].weight.any() and frozen_before.any()  # frozen params are not in the checkpoint
    assert sched2.last_epoch == 3 and opt2.state_dict()["state"][0]["step"] == 3
