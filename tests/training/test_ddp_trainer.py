"""The trainer under 2 gloo processes (as torchrun would start it) equals one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm2comp.training import load_config, train
from llm2comp.training.config import ConfigError


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
    except ConfigError as exc:
        outcome = str(exc)
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(outcome)
    dist.destroy_process_group()


def test_ranks_reading_different_data_stop_together(tiny_dir, lee_texts, tmp_path):
    """Both ranks raise the same clear error (under NCCL a rank training alone would hang the other)."""
    files = []
    for name, texts in (("a.txt", lee_texts[:40]), ("b.txt", lee_texts[40:80])):
        (tmp_path / name).write_text("\n".join(texts) + "\n")
        files.append(str(tmp_path / name))
    mp.spawn(_mismatch_worker, args=(_free_port(), str(tiny_dir), files, str(tmp_path / "out"), str(tmp_path)),
             nprocs=2)
    for rank in (0, 1):
        assert "differ in their options or in the rows of --data" in (tmp_path / f"rank{rank}.txt").read_text()
