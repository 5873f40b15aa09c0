"""Output directories: never writing into one that holds other files.

`require_empty` refuses a directory that holds anything (``llm2comp merge``, and ``llm2comp train`` where the
directory holds no run).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["contents", "require_empty"]


def contents(directory: Path) -> list[str]:
    """The sorted names in `directory` (none where it is not a directory)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir())


def require_empty(directory: Path, label: str = "") -> None:
    """Refuse a `directory` that is a file or holds anything: writing into it would mix or replace what is
    there. `label` prefixes its name in the message (``"--output "``)."""
    found = contents(directory)
    if directory.is_file() or found:
        what = f" ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
        raise FileExistsError(f"{label}{directory} exists and is not an empty directory{what}: give a new one")
