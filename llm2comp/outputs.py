"""Output directories: never writing into one that holds other files, and one process at a time in each.

`require_empty` refuses a directory that holds anything (``llm2comp merge``, and ``llm2comp train`` where the
directory holds no run). `exclusive` holds an OS lock on a directory for as long as a run writes into it: a second
process fails at once, naming the first one's PID; the OS releases the lock when its holder dies, however it dies.
The lock file (hidden) stays in the directory and never counts as its contents.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["LOCK_NAME", "contents", "exclusive", "require_empty"]

LOCK_NAME = ".llm2comp.lock"  # what the OS lock is taken on
_PID_NAME = ".llm2comp.pid"  # the holder's PID, while it holds the lock
_OURS = (LOCK_NAME, _PID_NAME)


def contents(directory: Path) -> list[str]:
    """The sorted names in `directory` but the lock's files (none where it is not a directory)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name not in _OURS)


def require_empty(directory: Path, label: str = "") -> None:
    """Refuse a `directory` that is a file or holds anything: writing into it would mix or replace what is
    there. `label` prefixes its name in the message (``"--output "``)."""
    found = contents(directory)
    if directory.is_file() or found:
        what = f" ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
        raise FileExistsError(f"{label}{directory} exists and is not an empty directory{what}: give a new one")


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on `directory` (created if missing) while the block runs; raise BlockingIOError,
    naming the holder's PID, if another process holds it. A directory this call created and nothing wrote into is
    removed again."""
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock, pid_file = FileLock(directory / LOCK_NAME), directory / _PID_NAME
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = f"PID {pid_file.read_text().strip()}"
        except OSError:
            holder = "PID unknown"
        raise BlockingIOError(f"{directory} is in use by another llm2comp process ({holder}): wait for it to end, "
                              "or give another directory") from None
    try:
        pid_file.write_text(f"{os.getpid()}\n")
        yield
    finally:
        pid_file.unlink(missing_ok=True)
        if created and not contents(directory):
            with contextlib.suppress(OSError):
                (directory / LOCK_NAME).unlink()
                directory.rmdir()
        lock.release()
