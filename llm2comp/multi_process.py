"""Encoding on several devices at once: one worker process per device, each with the model.

`LLM2Comp.start_multi_process_pool(devices)` starts the workers (spawned, as CUDA cannot be forked; the model
is sent once, its tensors through shared memory); ``encode(..., pool=pool)`` hands each idle worker the next
chunk of the texts (length-sorted, so each chunk's batches pad little) and puts the embeddings back in input
order; ``encode(..., device=[...])`` does both for one call.

- A worker's exception is raised again in the caller, with the worker's traceback as its cause, once the
  other workers have finished their chunks; the pool goes on.
- A worker that dies (killed, out of host memory), or an interrupt in the caller (Ctrl-C), closes the pool:
  busy workers are stopped, not waited for. Workers ignore SIGINT; the caller stops them.
- Each worker talks to the caller over its own pipe, so one dying mid-message cannot block the others, and
  the caller sees its death (EOF, exit) at once.
- CPU workers read the caller's CPU tensors in shared memory (no copy: changing the model in place changes
  what they encode); GPU workers copy the model to their device when they start.
- Threads may share a pool: their `encode` calls run one after the other.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Sequence
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp

from .encode_loop import encode_batches

__all__ = ["EncodePool", "WorkerTraceback", "checked_device", "is_device_list"]

CHUNKS_PER_WORKER = 4  # chunks per worker and call: enough to even out uneven texts, few enough to batch well
MAX_CHUNK_BATCHES = 64  # at most this many batches per chunk, so a worker reports back often
_STOP_WAIT_S = 10.0  # how long `close` lets idle workers exit before terminating them


class WorkerTraceback(Exception):
    """The traceback of an exception raised in an encode worker (the cause of the one raised in the caller)."""


def _serve(model, device: torch.device, threads: int, conn) -> None:
    """Worker: move the model to `device`, then answer each ``(texts, batch_size, options)`` job until None (or
    the caller's end of the pipe closes). Replies: ``("ready", None)`` once, ``("done", embeddings)`` or
    ``("error", _portable(exc))``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the caller stops us
    if threads:
        torch.set_num_threads(threads)
    try:
        try:
            model.to(device)
        except Exception as exc:
            conn.send(("error", _portable(exc)))
            return
        conn.send(("ready", None))
        while (job := conn.recv()) is not None:
            texts, batch_size, options = job
            try:
                reply = ("done", encode_batches(model, texts, batch_size, False, None, **options).cpu().numpy())
            except Exception as exc:
                reply = ("error", _portable(exc))
            conn.send(reply)
    except (EOFError, OSError):  # the caller closed its end: nothing left to do
        pass


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


def is_device_list(device) -> bool:
    """Whether a `device` argument names several devices (a list or tuple of them) rather than one."""
    return isinstance(device, Sequence) and not isinstance(device, str)


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
    return [checked_device(d) for d in devices]


def checked_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device (CUDA with its index), or ValueError if it is malformed or not visible."""
    try:
        out = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r}: {exc}") from None
    if out.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        out = torch.device("cuda", out.index if out.index is not None else 0)
        if out.index >= count:
            raise ValueError(f"device {device!r}: {count} CUDA device(s) visible")
    return out


def _cpu_threads(cpu_workers: int) -> int:
    """Threads per CPU worker: the cores this process may use, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // cpu_workers)


def _allow_open_files(model: torch.nn.Module) -> None:
    """Raise the soft limit on open files to what sending the model needs, if the hard limit allows: torch shares
    each tensor storage through a file descriptor that stays open (about 700 for a 32-layer model, over the common
    soft limit of 1024 at 48 layers)."""
    try:
        import resource
    except ImportError:  # not on Unix: no such limit to raise
        return
    storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(storages) + 512
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            raise RuntimeError(f"the model has {len(storages)} tensor storages to share with the workers, one open "
                               f"file each, but this process may open {hard} files: raise the limit (ulimit -n)")


def _start(process) -> None:
    """Start a worker; its model goes through shared memory (/dev/shm), which containers often keep small."""
    try:
        process.start()
    except RuntimeError as exc:
        if "No space left on device" in str(exc) or "shared memory" in str(exc):
            raise RuntimeError(f"{exc}: the model is sent to the workers through shared memory (/dev/shm); give it "
                               "room for the model (docker run --shm-size=..., or --ipc=host)") from exc
        raise


def _stop(workers: list, busy: set) -> None:
    """Stop the workers: idle ones are told to exit, busy ones (mid-chunk) terminated; all joined."""
    deadline = time.monotonic() + _STOP_WAIT_S
    for i, (process, conn) in enumerate(workers):
        if i in busy:
            process.terminate()
        else:
            try:
                conn.send(None)
            except OSError:
                pass
    for process, conn in workers:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
        conn.close()
    workers.clear()
    busy.clear()


class EncodePool:
    """Worker processes encoding with `model`, one per device; stop them with `close()` or a ``with`` block
    (or by dropping the pool). See the module's docstring for what happens on errors and interrupts."""

    def __init__(self, model, devices: Sequence[str | torch.device] | None = None):
        self.devices = _devices(devices)
        self.hidden_size = model.hidden_size
        self._model = weakref.ref(model)
        self._workers: list = []  # (process, the caller's end of its pipe)
        self._busy: set[int] = set()  # workers with a chunk in hand
        self._lock = threading.Lock()  # one `encode` at a time: each reads the replies to its own chunks
        self._stopper = weakref.finalize(self, _stop, self._workers, self._busy)
        cpu_workers = sum(d.type == "cpu" for d in self.devices)
        ctx = mp.get_context("spawn")
        try:
            home = model.device
            try:
                model.to("cpu")  # sent from there once, through shared memory
                _allow_open_files(model)
                for device in self.devices:
                    here, there = ctx.Pipe()
                    threads = _cpu_threads(cpu_workers) if device.type == "cpu" else 0
                    process = ctx.Process(target=_serve, args=(model, device, threads, there), daemon=True)
                    _start(process)
                    there.close()  # the worker's end lives in the worker only: its death is EOF here
                    self._workers.append((process, here))
                for i in range(len(self._workers)):
                    kind, payload = self._receive(i)
                    if kind == "error":
                        _raise_from_worker(payload, self.devices[i])
            finally:
                model.to(home)
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return not self._stopper.alive

    def belongs_to(self, model) -> bool:
        """Whether the pool was started from `model`."""
        return self._model() is model

    def _receive(self, i: int) -> tuple:
        """Worker `i`'s next reply; RuntimeError, and the pool closed, if it died first."""
        process, conn = self._workers[i]
        wait([conn, process.sentinel])
        try:
            return conn.recv()
        except (EOFError, OSError):
            process.join(timeout=1.0)
            self.close()
            raise RuntimeError(f"the encode worker on {self.devices[i]} died (exit code {process.exitcode}); "
                               "the pool is closed") from None

    def encode(self, texts: list[str], batch_size: int, show_progress_bar: bool, **options) -> torch.Tensor:
        """float32 `[n, D]` CPU embeddings of `texts` in order; `options`: those of `encode_batches`, checked.
        Calls from several threads run one after the other."""
        with self._lock:
            return self._encode(texts, batch_size, show_progress_bar, **options)

    def _encode(self, texts: list[str], batch_size: int, show_progress_bar: bool, **options) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("this encode pool is closed")
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        batches = math.ceil(len(texts) / (batch_size * CHUNKS_PER_WORKER * len(self.devices)))
        per_chunk = batch_size * min(max(1, batches), MAX_CHUNK_BATCHES)
        chunks = [order[s:s + per_chunk] for s in range(0, len(order), per_chunk)]
        todo = iter(range(len(chunks)))
        held: dict[int, int] = {}  # worker -> the chunk it is encoding
        out = torch.empty(len(texts), self.hidden_size)
        failure = None
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(texts), desc="Texts", unit="text")

        def hand_out(i: int) -> None:
            chunk = next(todo, None) if failure is None else None
            if chunk is None:
                return
            self._busy.add(i)  # before the send: an interrupt during it must not leave the worker taken for idle
            try:
                self._workers[i][1].send(([texts[j] for j in chunks[chunk]], batch_size, options))
            except OSError:  # the worker is gone (killed while idle): its death, said by `_receive`
                self._receive(i)
                raise
            held[i] = chunk

        try:
            for i in range(len(self._workers)):
                hand_out(i)
            while held:
                ready = set(wait([c for i in held for c in (self._workers[i][1], self._workers[i][0].sentinel)]))
                for i in [i for i in held if {self._workers[i][1], self._workers[i][0].sentinel} & ready]:
                    kind, payload = self._receive(i)
                    chunk = held.pop(i)
                    self._busy.discard(i)
                    if kind == "error":
                        failure = failure or (payload, self.devices[i])
                        continue
                    out[chunks[chunk]] = torch.from_numpy(payload)
                    if bar is not None:
                        bar.update(len(chunks[chunk]))
                    hand_out(i)
        except BaseException:  # an interrupt, or a dead worker: the busy ones cannot be waited for
            self.close()
            raise
        finally:
            if bar is not None:
                bar.close()
        if failure is not None:
            _raise_from_worker(*failure)
        return out

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._stopper()

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
