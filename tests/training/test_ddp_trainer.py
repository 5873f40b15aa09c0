"""The trainer under 2 gloo processes (as torchrun would start it) equals one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm2comp.training import load_config, train
from llm2comp.training.config import ConfigError
from llm2comp.training.data import DataError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _options(tiny_dir, data, output, batch_size):
    # dropout off: ranks draw different masks than one process would, by design
    return {"model": tiny_dir, "data": data, "output": output, "batch_size": batch_size, "max_length": 48,
            "max_steps": 3, "lora_dropout": 0.0, "attention_backend": "torch", "lr": 1e-3}


def _worker(rank, port, stage, tiny_dir, data, output, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    records = train(load_config(stage, **_options(tiny_dir, data, output, 2)), progress=False)
    if rank == 0:
        torch.save(records, result)
    dist.destroy_process_group()
    os._exit(0)  # past the interpreter's teardown, where a gloo thread now and then aborted the process


@pytest.mark.parametrize("stage", ["supervised", "compress"])
def test_two_ranks_equal_one_process(stage, tiny_dir, pairs_file, tmp_path):
    from .conftest import LEE_BACKGROUND

    data = str(pairs_file if stage == "supervised" else LEE_BACKGROUND)
    mp.spawn(_worker, args=(_free_port(), stage, str(tiny_dir), data, str(tmp_path / "ddp"), str(tmp_path / "r.pt")),
             nprocs=2)
    ddp = torch.load(tmp_path / "r.pt")
    single = train(load_config(stage, **_options(str(tiny_dir), data, str(tmp_path / "one"), 4)), progress=False)
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-4, abs=1e-6)


def _mismatch_worker(rank, port, tiny_dir, data_files, output, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    try:
        train(load_config("unsupervised", **_options(tiny_dir, data_files[rank], output, 2)), progress=False)
        outcome = "trained"
    except (ConfigError, DataError) as exc:
        outcome = str(exc)
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(outcome)
    dist.destroy_process_group()
    os._exit(0)  # past the interpreter's teardown, where a gloo thread now and then aborted the process


@pytest.mark.parametrize("second", ["other rows", "missing"])
def test_ranks_reading_different_data_stop_together(second, tiny_dir, lee_texts, tmp_path):
    """Every rank raises a clear error, none waits for the other (under NCCL a rank training alone, or one
    stopped by its own data error, would hang the other)."""
    (tmp_path / "a.txt").write_text("\n".join(lee_texts[:40]) + "\n")
    if second == "other rows":
        (tmp_path / "b.txt").write_text("\n".join(lee_texts[40:80]) + "\n")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    mp.spawn(_mismatch_worker, args=(_free_port(), str(tiny_dir), files, str(tmp_path / "out"), str(tmp_path)),
             nprocs=2)
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert "differ in their options or in the rows of --data" in outcomes[0]
    assert outcomes[1].endswith("b.txt: no such file") if second == "missing" else outcomes[1] == outcomes[0]
