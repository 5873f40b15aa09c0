"""Encoding on several devices at once (here two CPU workers): the embeddings of one process, in input order;
worker errors and deaths reach the caller."""

import copy
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from llm2comp.multi_process import WorkerTraceback
from tests.tiny_models import perturb

TEXTS = [("word " * (i % 13 + 1) + str(i)).strip() for i in range(45)] + [""]
# the caller encodes on merged LoRA weights (`llm2comp.merged_weights`), CPU workers on peft's layers (their weights
# are in shared memory): float32 rounding apart
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def encoder(tiny_encoder):
    return perturb(tiny_encoder)


def test_several_devices_give_the_embeddings_of_one_process(encoder):
    ref = encoder.encode(TEXTS, batch_size=4, normalize_embeddings=True, instruction="Query: ")
    out = encoder.encode(TEXTS, batch_size=4, normalize_embeddings=True, instruction="Query: ",
                         device=["cpu", "cpu"], convert_to_tensor=True)
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, **TOL)
    assert not encoder.training and encoder.device.type == "cpu"
    start = time.monotonic()
    assert encoder.encode([], device=["cpu", "cpu"]).shape == (0, encoder.hidden_size)
    assert time.monotonic() - start < 1  # no workers started for nothing


def test_a_pool_is_reused_and_reports_worker_errors_and_deaths(encoder):
    ref = encoder.encode(TEXTS, batch_size=3)
    with encoder.start_multi_process_pool(["cpu", "cpu"]) as pool:
        np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=3, pool=pool), ref, **TOL)
        single = encoder.encode(TEXTS[7], batch_size=3, pool=pool)
        assert single.shape == (encoder.hidden_size,)
        np.testing.assert_allclose(single, ref[7], **TOL)
        assert encoder.encode([], pool=pool).shape == (0, encoder.hidden_size)
        # an exception in a worker is raised here, of its type, with the worker's traceback as its cause
        with pytest.raises(ValueError, match="max_length=4 leaves no room for text") as caught:
            encoder.encode(TEXTS, pool=pool, max_length=4)
        assert isinstance(caught.value.__cause__, WorkerTraceback)
        assert "in the encode worker on cpu" in str(caught.value.__cause__)
        # ... and the pool goes on, ignoring what the failed call left
        np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=3, pool=pool), ref, **TOL)
        process = pool._workers[1][0]
        process.kill()
        process.join()
        with pytest.raises(RuntimeError, match=r"the encode worker on cpu died \(exit code -9\); the pool is closed"):
            encoder.encode(TEXTS, pool=pool)
        assert pool.closed
        with pytest.raises(RuntimeError, match="this encode pool is closed"):
            encoder.encode(TEXTS, pool=pool)


def test_threads_sharing_a_pool_each_get_their_own_embeddings(encoder):
    """A server's threads may share one pool: their calls run one after the other, none reads another's replies."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = [TEXTS[k::4] for k in range(4)]
    refs = [encoder.encode(texts, batch_size=2) for texts in inputs]
    with encoder.start_multi_process_pool(["cpu", "cpu"]) as pool, ThreadPoolExecutor(4) as threads:
        outs = list(threads.map(lambda texts: encoder.encode(texts, batch_size=2, pool=pool), inputs * 3))
    for out, ref in zip(outs, refs * 3):
        np.testing.assert_allclose(out, ref, **TOL)


def test_an_interrupt_stops_busy_workers_at_once(encoder, monkeypatch):
    """Ctrl-C while the workers encode: the pool closes without waiting for their chunks."""
    from llm2comp import multi_process

    with encoder.start_multi_process_pool(["cpu", "cpu"]) as pool:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        processes = [process for process, _ in pool._workers]
        monkeypatch.setattr(multi_process, "wait", interrupted)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            encoder.encode(TEXTS * 20, batch_size=2, pool=pool)
        assert pool.closed and time.monotonic() - start < 5
        assert [process.exitcode for process in processes] == [-15, -15]  # terminated mid-chunk


_LEFT_OPEN = """
import sys
from llm2comp import LLM2Comp
if __name__ == "__main__":
    model = LLM2Comp.from_pretrained(sys.argv[1], num_memory_tokens=4, lora_rank=4)
    pool = model.start_multi_process_pool(["cpu", "cpu"])
    print(model.encode(["a text", "another one"], pool=pool).shape)
"""


def test_a_pool_left_open_stops_with_the_interpreter(tiny_dirs, tmp_path):
    script = tmp_path / "left_open.py"
    script.write_text(_LEFT_OPEN)
    done = subprocess.run([sys.executable, str(script), str(tiny_dirs["llama"])], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(2, 64)" in done.stdout and "Exception ignored" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("soft, hard, raised_to, error", [(1024, 4096, 1536, False), (1024, 1100, 1100, True),
                                                      (4096, 4096, None, False)])
def test_the_open_file_limit_is_raised_for_the_shared_tensors(soft, hard, raised_to, error, monkeypatch):
    """One open file per shared tensor storage (+512 to spare): 1024 here, as a 32-layer model has about 700."""
    import resource

    from llm2comp.multi_process import _allow_open_files

    model = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(512)))  # 1024 storages
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    if error:
        with pytest.raises(RuntimeError, match="1024 tensor storages .* may open 1100 files: raise the limit"):
            _allow_open_files(model)
    else:
        _allow_open_files(model)
    assert calls == ([(raised_to, hard)] if raised_to else [])


def test_a_full_dev_shm_is_explained(encoder, monkeypatch):
    def no_room(self):
        raise RuntimeError("unable to write to file </torch_123_456_0>: No space left on device (28)")

    monkeypatch.setattr(torch.multiprocessing.get_context("spawn").Process, "start", no_room)
    with pytest.raises(RuntimeError, match=r"No space left on device \(28\): the model is sent to the workers "
                                           r"through shared memory \(/dev/shm\); give it room"):
        encoder.start_multi_process_pool(["cpu"])
    assert encoder.device.type == "cpu"


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"device": []}, ValueError, "devices is empty"),
    ({"device": ["cpu", "cuda:0"]}, ValueError, r"device 'cuda:0': 0 CUDA device\(s\) visible"),
    ({"device": ["cpu", "tpu"]}, ValueError, "device .tpu.: Expected one of"),
])
def test_bad_device_lists_fail_before_any_worker_starts(encoder, kwargs, exc, match, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("torch.multiprocessing.get_context", lambda *a: pytest.fail("a worker was started"))
    with pytest.raises(exc, match=match):
        encoder.encode(TEXTS, **kwargs)


def test_pool_arguments_are_checked(encoder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is visible: pass the devices"):
        encoder.start_multi_process_pool()
    with pytest.raises(TypeError, match="devices must be a list of devices, got str"):
        encoder.start_multi_process_pool("cpu")

    class FakePool:
        def belongs_to(self, model):
            return model is encoder

    with pytest.raises(ValueError, match="give device or pool, not both"):
        encoder.encode(TEXTS, pool=FakePool(), device="cpu")
    with pytest.raises(ValueError, match="pool was started from another model"):
        copy.deepcopy(encoder).encode(TEXTS, pool=FakePool())


@pytest.mark.gpu
def test_gpu_workers_give_the_embeddings_of_the_caller(encoder):
    """Two workers on the GPU (one is lent) encode as the caller does there; the caller's model stays on it."""
    encoder.to("cuda")
    ref = encoder.encode(TEXTS, batch_size=4)
    out = encoder.encode(TEXTS, batch_size=4, device=["cuda:0", "cuda:0"])
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-3)
    assert encoder.device.type == "cuda"
