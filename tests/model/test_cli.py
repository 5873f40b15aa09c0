import numpy as np
import pytest

from llm2comp import cli


def test_help_lists_commands_even_if_one_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, ("ghost", "llm2comp.no_such_module:add_parser")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("encode", "eval", "train", "demo", "bench", "ghost"))
    assert "unavailable" in out
    assert cli.main(["ghost"]) == 2


def test_encode_command_writes_npy(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert cli.main(["encode", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--output", str(out),
                     "Rain fell.", "Fires burned."]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 64) and emb.dtype == np.float32


def test_eval_command_prints_table(tiny_dirs, capsys):
    assert cli.main(["eval", "--model", str(tiny_dirs["qwen2"]), "--device", "cpu", "--pooling", "last",
                     "--batch-size", "25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["pooling", "pearson", "spearman"]
    name, p, s = lines[2].split()
    assert name == "last" and -1 <= float(p) <= 1 and -1 <= float(s) <= 1


def test_bench_passes_arguments_through(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--only", "no_such_bench"])
    assert "unknown benchmarks" in capsys.readouterr().err
