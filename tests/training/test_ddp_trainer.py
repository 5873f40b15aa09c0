"""The trainer under 2 gloo processes (as torchrun would start it) equals one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm2comp.training import load_config, train


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
