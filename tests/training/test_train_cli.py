"""``llm2comp train`` end to end on a tiny model (three chained stages, TOML config, bad data)."""

import importlib.util
import json
import re

import pytest

from llm2comp.cli import main
from llm2comp.training.checkpoint import latest_checkpoint

from .conftest import LEE_BACKGROUND


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_three_stages_chained(tiny_dir, pairs_file, tmp_path, capsys):
    common = ["--max-length", "48", "--batch-size", "4", "--attention-backend", "torch", "--max-steps", "2"]
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    config = tmp_path / "s1.toml"
    config.write_text(f'model = "{tiny_dir}"\ndata = "{LEE_BACKGROUND}"\nobjective = "nll"\nsave-every = 1\n')
    assert main(["train", "compress", "--config", str(config), "--output", str(s1), *common]) == 0
    assert main(["train", "unsupervised", "--model", str(s1), "--data", str(LEE_BACKGROUND), "--output", str(s2),
                 "--gradient-checkpointing", *common]) == 0
    assert main(["train", "supervised", "--model", str(s2), "--data", str(pairs_file), "--output", str(s3),
                 "--grad-cache", "--chunk-size", "3", "--num-negatives", "2", *common]) == 0
    for out in (s1, s2, s3):
        assert (out / "llm2comp_config.json").is_file()
        log = _log(out)
        assert log[0]["event"] == "start" and log[-1] == {"event": "end", "step": 2}
        assert [r["step"] for r in log if "loss" in r] == [1, 2]
        assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in log if "loss" in r)
    assert latest_checkpoint(s1).name == "step-2"
    assert sorted(p.name for p in (latest_checkpoint(s1)).iterdir()) == ["meta.json", "state.pt",
                                                                          "trainable.safetensors"]
    assert json.loads((latest_checkpoint(s1) / "meta.json").read_text())["config"]["objective"] == "nll"
    assert "supervised: 2 steps, final loss" in capsys.readouterr().out


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--objective", "--min-split", "--resume", "--lora-dropout", "--precision", "--config"):
        assert flag in text
    assert "(default: 0.0001)" in text and "(default: 'kl')" in text
    assert "--data DATA training file" in text and "(default: '')" not in text
    assert text.count("(required: here or in --config)") == 2  # --data, --output
    assert "--objective {kl,nll,reconstruct} [compress only]" in text
    assert "--overwrite, --no-overwrite start afresh" in text
    assert "--temperature" not in text and "--num-negatives" not in text  # other stages' options are left out
    with pytest.raises(SystemExit):
        main(["train", "supervised", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--temperature TEMPERATURE [unsupervised and supervised only] contrastive temperature" in text
    assert "--num-negatives NUM_NEGATIVES [supervised only] hard negatives" in text
    assert "--objective" not in text and "--min-split" not in text


@pytest.mark.parametrize("stage, lines, message", [
    ("compress", [], "the file is empty"),
    ("compress", ["A long enough first line of text with many words in it for the split to work fine here.",
                  "Too short."], ":2: text too short to split"),
    ("supervised", ['{"query": "q", "positive": "p", "negatives": ["n"]}', '{"query": "q2", "negatives": ["n"]}'],
     ":2: missing field 'positive'"),
])
def test_bad_data_errors_name_file_and_line(stage, lines, message, tiny_dir, tmp_path, capsys):
    data = tmp_path / ("bad.jsonl" if stage == "supervised" else "bad.txt")
    data.write_text("\n".join(lines))
    code = main(["train", stage, "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--max-length", "48", "--batch-size", "1", "--attention-backend", "torch"])
    err = capsys.readouterr().err
    assert code == 2 and str(data) in err and message in err, err


def test_bad_option_is_reported(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('data = "x"\noutput = "y"\nlearning_rate = 1\n')
    assert main(["train", "compress", "--config", str(config)]) == 2
    assert "unknown options ['learning_rate']" in capsys.readouterr().err


def test_another_stages_flag_is_refused_by_name(capsys):
    """On the command line as in a config file: not argparse's top-level "unrecognized arguments"."""
    assert main(["train", "unsupervised", "--data", "d.txt", "--output", "o", "--objective", "nll"]) == 2
    assert ("llm2comp train unsupervised: --objective applies to the compress stage only, not to unsupervised"
            in capsys.readouterr().err)


def test_bad_output_is_reported(tmp_path, capsys):
    output = tmp_path / "a-file"
    output.write_text("x")
    assert main(["train", "compress", "--data", "d.txt", "--output", str(output)]) == 2
    assert f"llm2comp train compress: --output {output} is a file, not a directory" in capsys.readouterr().err


def test_missing_model_is_reported(tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("some text\n")
    assert main(["train", "unsupervised", "--model", str(tmp_path / "no_model"), "--data", str(data),
                 "--output", str(tmp_path / "o")]) == 2
    assert f"llm2comp train unsupervised: model directory {tmp_path / 'no_model'} does not exist" in \
        capsys.readouterr().err


def test_only_rank_0_prints_the_summary(tmp_path, monkeypatch, capsys):
    from llm2comp.training import distributed, trainer

    monkeypatch.setattr(trainer, "train", lambda cfg: [{"step": 1, "loss": 0.5}])
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 2))
        assert main(["train", "compress", "--data", "d.txt", "--output", str(tmp_path / "o")]) == 0
        assert ("compress: 1 steps, final loss 0.5000" in capsys.readouterr().out) == (rank == 0)


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_dir), "--output", str(out), "--device", "cpu", "--compress-steps", "2",
                 "--unsupervised-steps", "2", "--batch-size", "4", "--max-length", "48", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("Lee document similarity"):].splitlines()
    assert "seed 3" in table[0]
    rows = [line for line in table if line.startswith(("base", "+ stage", "TF-IDF"))]
    assert [r.split("  ")[0].strip() for r in rows] == [
        "base, mean pooling (baseline)", "base, memory tokens (untrained)", "+ stage 1: compression (kl)",
        "+ stage 2: SimCSE", "TF-IDF"]
    final, baseline = (rows[i].split()[-2:] for i in (3, 0))
    beats = all(float(f) > float(b) for f, b in zip(final, baseline))
    assert f"the trained memory tokens {'beat' if beats else 'do NOT beat'} the base model's mean pooling" in printed
    for row in rows:  # Pearson and Spearman, both correlations
        assert all(-1 <= float(x) <= 1 for x in row.split()[-2:])
    for stage in ("compress", "unsupervised"):
        assert (out / stage / "llm2comp_config.json").is_file()
    assert (out / "lee_demo.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)


def test_demo_recipe_leaves_out_a_stage_without_steps_and_gives_stage_1_its_objective(tmp_path):
    from llm2comp.training.demo import demo_configs

    both = demo_configs(tmp_path, "corpus.txt", compress_steps=3, unsupervised_steps=5, batch_size=4, max_length=64,
                        seed=7, objective="nll", attention_dropout=0.1)
    assert [(c.stage, c.max_steps, c.seed) for c in both] == [("compress", 3, 7), ("unsupervised", 5, 7)]
    assert both[0].objective == "nll" and both[1].model == both[0].output
    assert [c.attention_dropout for c in both] == [0.1, 0.1]
    (alone,) = demo_configs(tmp_path, "corpus.txt", compress_steps=0, unsupervised_steps=5, batch_size=4,
                            max_length=64, base="some-model")
    assert (alone.stage, alone.model, alone.fresh_lora) == ("unsupervised", "some-model", True)


def _recipe(tmp_path, tiny_dir, body):
    path = tmp_path / "recipe.toml"
    path.write_text(f'model = "{tiny_dir}"\ndata = "{LEE_BACKGROUND}"\noutput = "{tmp_path / "run"}"\n'
                    'max-length = 48\nbatch-size = 4\nattention-backend = "torch"\n' + body)
    return path


def test_recipe_runs_its_stages_in_order_from_one_model(tiny_dir, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_dir, '[compress]\nobjective = "nll"\nmax-steps = 2\n'
                                         '[unsupervised]\nmax-steps = 1\nlr = 1e-3\n')
    assert main(["recipe", str(recipe), "--no-eval"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("compress: loss") < printed.index("unsupervised: loss")
    first, second = (json.loads((tmp_path / "run" / s / "checkpoints" / f"step-{n}" / "meta.json").read_text())
                     for s, n in (("compress", 2), ("unsupervised", 1)))
    assert (first["config"]["objective"], first["config"]["max_length"]) == ("nll", 48)
    assert second["config"]["model"] == str(tmp_path / "run" / "compress") and second["config"]["lr"] == 1e-3
    assert (tmp_path / "run" / "unsupervised" / "merged_lora.safetensors").is_file()  # stage 1's LoRA folded
    assert main(["recipe", str(recipe), "--no-eval"]) == 2  # a finished recipe is not run over
    assert "holds a run" in capsys.readouterr().err
    assert main(["recipe", str(recipe), "--no-eval", "--resume"]) == 0  # nothing left to train: reloads, saves
    printed = capsys.readouterr().out
    assert "compress: finished before" in printed and "unsupervised: finished before" in printed


@pytest.mark.parametrize("body, message", [
    ("", "a recipe has one table per stage"),
    ("[pretrain]\nmax-steps = 1\n", r"one table per stage .* got \['pretrain'\]"),
    ("[unsupervised]\nobjective = \"kl\"\n", "--objective applies to the compress stage only, not to unsupervised"),
    ("[compress]\nmax-stepz = 1\n", r"recipe.toml \[compress\]: unknown options \['max_stepz'\]"),
    ("[compress]\nlr = \"fast\"\n", r"recipe.toml \[compress\]: lr must be a number, got 'fast'"),
])
def test_recipe_errors_name_the_file_table_and_key(body, message, tiny_dir, tmp_path, capsys):
    assert main(["recipe", str(_recipe(tmp_path, tiny_dir, body)), "--no-eval"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_cpu_recipe_loads_and_the_training_docs_show_it_as_it_is():
    from pathlib import Path

    from llm2comp.training.config import load_recipe

    root = Path(__file__).resolve().parents[2]
    recipe = root / "recipes" / "smollm2-cpu.toml"
    configs = load_recipe(recipe)
    assert [c.stage for c in configs] == ["compress", "unsupervised", "supervised"]
    assert (configs[1].data, configs[2].data, configs[2].num_negatives) == ("general.txt", "package-pairs.jsonl", 0)
    shown = (root / "docs" / "training.md").read_text().split("```toml\n")[1].split("```")[0]
    assert recipe.read_text().endswith(shown)  # the file is its header comments and then what the docs show
