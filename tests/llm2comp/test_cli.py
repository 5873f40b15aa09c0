import json
import sys
from pathlib import Path

import numpy as np
import pytest

from llm2comp import cli


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("encode", "eval", "merge", "data", "train", "recipe", "demo", "bench"))


def test_encode_command_writes_npy(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert cli.main(["encode", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--output", str(out),
                     "Rain fell.", "Fires burned."]) == 0
    emb = np.load(out)
    assert emb.shape == (2, 64) and emb.dtype == np.float32


def test_encode_command_keeps_lines_and_names_the_file(tiny_dirs, tmp_path, capsys):
    lines = tmp_path / "texts.txt"
    # BOM, blank line, U+2028, CRLF, a lone CR (a Python text read would end the line there)
    lines.write_bytes("\ufeffRain fell.\n\nFires\u2028burned.\r\nA lone\rreturn.\n".encode())
    assert cli.main(["encode", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--input", str(lines),
                     "--output", str(tmp_path / "emb")]) == 0
    assert str(tmp_path / "emb.npy") in capsys.readouterr().out
    emb = np.load(tmp_path / "emb.npy")
    assert emb.shape == (4, 64)  # row i is line i
    direct = cli.main(["encode", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "Rain fell."])
    assert direct == 0
    np.testing.assert_allclose(emb[0], [float(x) for x in capsys.readouterr().out.strip()[1:-1].split(",")],
                               atol=1e-5)


def test_encode_command_on_several_devices(tiny_dirs, tmp_path, capsys):
    texts = [f"text number {i}" for i in range(9)]
    one, two = tmp_path / "one.npy", tmp_path / "two.npy"
    assert cli.main(["encode", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--output", str(one),
                     "--batch-size", "2", *texts]) == 0
    assert cli.main(["encode", "--model", str(tiny_dirs["llama"]), "--device", "cpu, cpu,", "--output", str(two),
                     "--batch-size", "2", *texts]) == 0
    np.testing.assert_allclose(np.load(two), np.load(one), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--model", "{tmp}/no_model", "--output", "{tmp}/missing/emb.npy", "x"], "--output folder .*missing"),
    (["--model", "{tmp}/no_model", "x"], "no_model does not exist"),
    (["--model", "{llama}", "--pooling", "mean", "ok", " "], r"sentences\[1\] is empty"),
    (["--model", "{tmp}/no_model", "--device", "gpu", "x"], "device 'gpu': Expected one of .*device type"),
    (["--model", "{tmp}/no_model", "--device", "cuda:99", "x"], r"device 'cuda:99': \d+ CUDA device\(s\) visible"),
    (["--model", "{tmp}/no_model", "--device", "cpu,gpu", "x"], "device 'gpu': Expected one of"),
])
def test_encode_command_errors_are_one_line(tiny_dirs, tmp_path, capsys, argv, message):
    import re

    argv = [a.format(tmp=tmp_path, llama=tiny_dirs["llama"]) for a in argv]
    assert cli.main(["encode", "--device", "cpu", *argv]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading progress bars
    assert last.startswith("llm2comp encode: error:") and re.search(message, last)


@pytest.mark.parametrize("option", ["--batch-size", "--max-length"])
def test_encode_command_rejects_non_positive_sizes(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["encode", option, "0", "x"])
    assert exit_info.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_eval_command_prints_table(tiny_dirs, capsys):
    assert cli.main(["eval", "--model", str(tiny_dirs["qwen2"]), "--device", "cpu", "--pooling", "last",
                     "--batch-size", "25", "--tasks", "lee", "--no-baselines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["row", "lee", "r", "lee", "rho", "average", "s"]
    name, pooling, p, s, average, _ = lines[2].split()
    assert (name, pooling) == ("model", "last") and -1 <= float(p) <= 1 and -1 <= float(s) <= 1
    assert average == p


def test_eval_command_checks_the_data_dir_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model was loaded"))
    assert cli.main(["eval", "--data-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{tmp_path} lacks one of" in captured.err


def test_parser_builds_without_torch():
    """`llm2comp --help` and every subcommand's help stay quick: building the parser imports neither torch nor
    transformers (seconds on a small machine); the handlers import them."""
    import subprocess

    code = ("import sys, llm2comp.cli as cli; cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bench_passes_arguments_through(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--only", "no_such_bench"])
    assert "unknown benchmarks" in capsys.readouterr().err


def test_bench_outside_a_checkout_says_what_to_run(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    # as an installed script sees it: no folder on the path holds benchmarks/
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".") / "benchmarks").is_dir()])
    assert cli.main(["bench", "--quick", "--out", "my dir"]) == 2
    assert "python -m benchmarks --quick --out 'my dir'" in capsys.readouterr().err


def test_bench_with_a_broken_import_fails_loudly(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "benchmarks.harness", None)  # a module of the benchmarks fails to import
    with pytest.raises(ModuleNotFoundError, match="benchmarks.harness"):
        cli.main(["bench", "--quick", "--out", str(tmp_path)])


def test_merge_command_writes_a_model_that_encodes_the_same(tiny_encoder, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from llm2comp import LLM2Comp
    from tests.tiny_models import perturb

    from .test_model import TEXTS

    perturb(tiny_encoder).save_pretrained(tmp_path / "trained")
    expected = tiny_encoder.encode(TEXTS)
    assert cli.main(["merge", str(tmp_path / "trained"), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    assert f"wrote the merged model (torch.float32) to {tmp_path / 'merged'}" in capsys.readouterr().out
    merged = LLM2Comp.from_pretrained(str(tmp_path / "merged"))
    assert json.loads((tmp_path / "merged" / "llm2comp_config.json").read_text())["merged"]
    np.testing.assert_allclose(merged.encode(TEXTS), expected, rtol=1e-4, atol=1e-5)
    served = SentenceTransformer(str(tmp_path / "merged"), trust_remote_code=True)
    np.testing.assert_allclose(served.encode(TEXTS), expected, rtol=1e-4, atol=1e-5)
    # never into a directory that holds something: old weight shards would be mixed with the new ones
    assert cli.main(["merge", str(tmp_path / "trained"), str(tmp_path / "merged")]) == 2
    assert "merged exists and is not an empty directory" in capsys.readouterr().err


def test_encode_command_finds_a_moved_base_model(tiny_encoder, tiny_dirs, tmp_path, capsys):
    import shutil

    base = shutil.copytree(tiny_dirs["llama"], tmp_path / "base")
    tiny_encoder.base_reference = {"name_or_path": str(base)}
    tiny_encoder.save_pretrained(tmp_path / "enc")
    expected = tiny_encoder.encode(["Rain fell."])
    base.rename(tmp_path / "moved")
    argv = ["encode", "--model", str(tmp_path / "enc"), "--device", "cpu", "--output", str(tmp_path / "emb.npy"),
            "Rain fell."]
    assert cli.main(argv) == 2
    assert "--base-model on the command line" in capsys.readouterr().err
    assert cli.main([*argv, "--base-model", str(tmp_path / "moved")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected, rtol=1e-5, atol=1e-6)


def test_encode_command_quantizes_truncates_and_uses_saved_prompts(tiny_encoder, tmp_path, capsys):
    tiny_encoder.prompts = {"query": "Query: "}
    tiny_encoder.save_pretrained(tmp_path / "m")
    texts = ["Rain fell.", "Fires burned.", "The market rose."]
    out = tmp_path / "emb.npy"
    assert cli.main(["encode", "--model", str(tmp_path / "m"), "--device", "cpu", "--output", str(out),
                     "--prompt-name", "query", "--truncate-dim", "16", "--precision", "ubinary", *texts]) == 0
    assert "3 x 2 uint8 embeddings" in capsys.readouterr().out
    expected = tiny_encoder.encode(texts, prompt="Query: ", truncate_dim=16, precision="ubinary")
    np.testing.assert_array_equal(np.load(out), expected)
    assert cli.main(["encode", "--model", str(tmp_path / "m"), "--device", "cpu", "--precision", "int8",
                     *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(rows) == 3 and all(isinstance(x, int) and -128 <= x <= 127 for row in rows for x in row)
