"""Encoding on several devices at once: one worker process per device, each with its own copy of the model.

`LLM2Comp.start_multi_process_pool(devices)` starts the workers (spawned, as CUDA cannot be forked; the model
is sent once, its tensors through shared memory); ``encode(..., pool=pool)`` hands them chunks of the texts
(length-sorted, so each chunk's batches pad little) and puts the embeddings back in input order;
``encode(..., device=[...])`` does both for one call. A worker's exception is raised again in the caller with
the worker's traceback as its cause; a worker that dies (killed, out of host memory) closes the pool.
"""

from __future__ import annotations

import math
import os
import queue
import traceback
from collections.abc import Sequence

import torch
import torch.multiprocessing as mp

__all__ = ["EncodePool", "WorkerTraceback"]

_POLL_S = 1.0  # how often a caller waiting for results checks that the workers are alive
CHUNKS_PER_WORKER = 4  # chunks per worker and call: enough to even out uneven texts, few enough to batch well


class WorkerTraceback(Exception):
    """The traceback of an exception raised in an encode worker (the cause of the one raised in the caller)."""


def _serve(model, device: torch.device, threads: int, jobs, results) -> None:
    """Worker loop: move the model to `device`, then encode ``(call, chunk, texts, kwargs)`` jobs until None.

    Messages: ``(kind, device, call, chunk, payload)``, kind "ready", "done" (payload: the embeddings) or
    "error" (payload: `_portable`)."""
    from .encode import encode_texts

    if threads:
        torch.set_num_threads(threads)
    try:
        model.to(device)
    except Exception as exc:
        results.put(("error", device, None, None, _portable(exc)))
        return
    results.put(("ready", device, None, None, None))
    while (job := jobs.get()) is not None:
        call, chunk, texts, kwargs = job
        try:
            emb = encode_texts(model, texts, convert_to_numpy=True, show_progress_bar=False, **kwargs)
            results.put(("done", device, call, chunk, emb))
        except Exception as exc:
            results.put(("error", device, call, chunk, _portable(exc)))


def _portable(exc: Exception) -> tuple[Exception, str]:
    """The exception (or a RuntimeError with its text, if it does not pickle) and its formatted traceback."""
    import pickle

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc, text


def _raise_from_worker(portable: tuple[Exception, str], device: torch.device):
    exc, text = portable
    raise exc from WorkerTraceback(f"in the encode worker on {device}:\n{text}")


def _devices(devices: Sequence[str | torch.device] | None) -> list[torch.device]:
    """The workers' devices, checked: by default every visible CUDA GPU."""
    if devices is None:
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device is visible: pass the devices, e.g. ['cpu', 'cpu']")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be a list of devices, got {type(devices).__name__}")
    if not devices:
        raise ValueError("devices is empty: give at least one device")
    out = []
    for d in devices:
        device = torch.device(d)
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            device = torch.device("cuda", device.index if device.index is not None else 0)
            if device.index >= count:
                raise ValueError(f"device {d!r}: {count} CUDA device(s) visible")
        out.append(device)
    return out


class EncodePool:
    """Worker processes encoding with copies of `model`, one per device; close with `close()` or a ``with``.

    The model's current state is what the workers encode with; start a new pool after changing it.
    """

    def __init__(self, model, devices: Sequence[str | torch.device] | None = None):
        self.devices = _devices(devices)
        self.hidden_size, self.model_id = model.hidden_size, id(model)
        cpu_workers = sum(d.type == "cpu" for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else 0
        ctx = mp.get_context("spawn")
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        self._calls = 0
        home = model.device
        model.to("cpu")  # sent once, through shared memory; each worker then moves its copy to its device
        self._workers = []
        try:
            for device in self.devices:
                worker = ctx.Process(target=_serve, daemon=True,
                                     args=(model, device, threads if device.type == "cpu" else 0, self._jobs,
                                           self._results))
                worker.start()
                self._workers.append(worker)
            for _ in self.devices:
                kind, device, _, _, payload = self._next_result()
                if kind == "error":
                    _raise_from_worker(payload, device)
        except BaseException:
            self.close()
            raise
        finally:
            model.to(home)

    @property
    def closed(self) -> bool:
        return not self._workers

    def _check_alive(self) -> None:
        """RuntimeError, and the pool closed, if a worker died."""
        dead = [(d, w.exitcode) for d, w in zip(self.devices, self._workers) if not w.is_alive()]
        if dead:
            self.close()
            device, code = dead[0]
            raise RuntimeError(f"the encode worker on {device} died (exit code {code}); the pool is closed")

    def _next_result(self) -> tuple:
        """The next message of any worker (`_serve`), checking every `_POLL_S` seconds that all are alive."""
        while True:
            try:
                return self._results.get(timeout=_POLL_S)
            except queue.Empty:
                self._check_alive()

    def encode(self, texts: list[str], batch_size: int, show_progress_bar: bool, **kwargs) -> torch.Tensor:
        """float32 `[n, D]` CPU embeddings of `texts` in order; `kwargs`: `encode_texts` options for the workers."""
        if self.closed:
            raise RuntimeError("this encode pool is closed")
        self._check_alive()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        per_chunk = batch_size * max(1, math.ceil(len(texts) / (batch_size * CHUNKS_PER_WORKER * len(self.devices))))
        chunks = [order[s:s + per_chunk] for s in range(0, len(order), per_chunk)]
        self._calls += 1
        for i, chunk in enumerate(chunks):
            self._jobs.put((self._calls, i, [texts[j] for j in chunk], {"batch_size": batch_size, **kwargs}))
        out = torch.empty(len(texts), self.hidden_size)
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(texts), desc="Texts", unit="text")
        try:
            for _ in chunks:
                kind, device, call, i, payload = self._next_result()
                while call != self._calls:  # left by an earlier call that failed
                    kind, device, call, i, payload = self._next_result()
                if kind == "error":
                    self._drop_queued_jobs()
                    _raise_from_worker(payload, device)
                out[chunks[i]] = torch.from_numpy(payload)
                if bar is not None:
                    bar.update(len(chunks[i]))
        finally:
            if bar is not None:
                bar.close()
        return out

    def _drop_queued_jobs(self) -> None:
        try:
            while True:
                self._jobs.get_nowait()
        except queue.Empty:
            pass

    def close(self) -> None:
        """Stop the workers (idempotent); jobs not yet started are dropped."""
        workers, self._workers = self._workers, []
        self._drop_queued_jobs()
        for _ in workers:
            self._jobs.put(None)
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_workers", None):
            self.close()
