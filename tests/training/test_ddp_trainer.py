"""The trainer under 2 gloo processes (as torchrun would start it) equals one process on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm2comp.training import load_config, train
from llm2comp.training.config import ConfigError
from llm2comp.training.rows import DataError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _options(tiny_dir, data, output, batch_size):
    # dropout off: ranks draw different masks than one process would, by design
    return {"model": tiny_dir, "data": data, "output": output, "batch_size": batch_size, "max_length": 48,
            "max_steps": 3, "lora_dropout": 0.0, "attention_backend": "torch", "lr": 1e-3}


def _worker(rank, port, stage, tiny_dir, data, output, result, extra=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    records = train(load_config(stage, **_options(tiny_dir, data, output, 2), **(extra or {})), progress=False)
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


def test_a_two_rank_run_resumed_as_one_process_logs_the_uninterrupted_losses(tiny_dir, tmp_path):
    """The log window that spans the checkpoint is saved as means over the 2 ranks; one process resuming it
    rescales it, so its line averages the window's steps as the uninterrupted run's does (token-weighted)."""
    import shutil

    from .conftest import LEE_BACKGROUND

    tiny, data, out, extra = str(tiny_dir), str(LEE_BACKGROUND), tmp_path / "ddp", {"log_every": 3, "save_every": 1}
    mp.spawn(_worker, args=(_free_port(), "compress", tiny, data, str(out), str(tmp_path / "r.pt"), extra), nprocs=2)
    shutil.rmtree(out / "checkpoints" / "step-3")  # killed after its step-2 checkpoint, mid log window
    resumed = train(load_config("compress", **_options(tiny, data, str(out), 4), **extra, resume=True),
                    progress=False)
    single = train(load_config("compress", **_options(tiny, data, str(tmp_path / "one"), 4), **extra), progress=False)
    assert [r["step"] for r in resumed] == [r["step"] for r in single] == [3]
    assert resumed[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-4)


def _mismatch_worker(rank, port, tiny_dir, data_files, outputs, result_dir, extra=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    try:
        train(load_config("unsupervised", **_options(tiny_dir, data_files[rank], outputs[rank], 2), **(extra or {})),
              progress=False)
        outcome = "trained"
    except (ConfigError, DataError, OSError) as exc:
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
    mp.spawn(_mismatch_worker, args=(_free_port(), str(tiny_dir), files, [str(tmp_path / "out")] * 2, str(tmp_path)),
             nprocs=2)
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert "differ in their options, in the rows of --data" in outcomes[0]
    assert outcomes[1].endswith("b.txt: no such file") if second == "missing" else outcomes[1] == outcomes[0]


def test_ranks_resuming_from_different_checkpoints_stop_together(tiny_dir, lee_texts, tmp_path):
    """An --output on each node's own disk: rank 0 finds the run's checkpoint, rank 1 none. Both stop at the start
    (before, rank 0 resumed at step 2 and rank 1 at step 0, and their averaged gradients made a wrong model)."""
    data = tmp_path / "a.txt"
    data.write_text("\n".join(lee_texts[:40]) + "\n")
    extra = {"save_every": 1}
    train(load_config("unsupervised", **_options(str(tiny_dir), str(data), str(tmp_path / "node0"), 4), **extra),
          progress=False)
    outputs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    mp.spawn(_mismatch_worker, args=(_free_port(), str(tiny_dir), [str(data)] * 2, outputs, str(tmp_path),
                                     {**extra, "resume": True}), nprocs=2)
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert outcomes[0] == outcomes[1] and "or in the checkpoint they resume from" in outcomes[0]


def test_ranks_of_a_run_whose_output_is_taken_stop_together(tiny_dir, tmp_path):
    """Rank 0 alone takes the output directory's lock; when another process holds it, every rank stops at once."""
    import subprocess
    import sys

    from .conftest import LEE_BACKGROUND
    from .test_stages import _HOLD

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        mp.spawn(_mismatch_worker, args=(_free_port(), str(tiny_dir), [str(LEE_BACKGROUND)] * 2, [str(out)] * 2,
                                         str(tmp_path)), nprocs=2)
    finally:
        holder.kill()
        holder.wait()
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert f"is in use by another llm2comp process (PID {holder.pid})" in outcomes[0]
    assert outcomes[1] == f"--output {out}: rank 0 could not take the directory for this run (its error says why)"
