"""The Lee document similarity benchmark (Lee, Pincombe & Welsh, 2005).

50 news documents (``lee.cor``), a 50 x 50 matrix of mean human similarity ratings in [0, 1]
(``similarities0-1.txt``; the 1225 pairs i < j are scored) and 300 background documents from the
same source (``lee_background.cor``). Files are read from, in order: an explicit directory,
``$LLM2COMP_LEE_DIR``, ``../shared/data/lee`` next to the repository checkout, or the `gensim` wheel (fetched with
``pip download --no-deps`` into the llm2comp cache, never installed, its three files extracted beside it).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..default_model import cache_dir, pip_download

FILES = ("lee.cor", "lee_background.cor", "similarities0-1.txt")
WHEEL_DIR = "gensim/test/test_data/"
REPO_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "lee"
DIR_ENV = "LLM2COMP_LEE_DIR"

__all__ = ["LeeBenchmark", "lee_background_documents", "lee_dir", "lee_files", "load_lee", "local_lee_dir"]


@dataclass(frozen=True)
class LeeBenchmark:
    """documents: the 50 texts; pairs: ``(i, j)`` with i < j (1225); ratings: human rating per pair."""

    documents: list[str]
    pairs: list[tuple[int, int]]
    ratings: list[float]


def local_lee_dir() -> Path:
    """The folder tried before the gensim wheel: ``$LLM2COMP_LEE_DIR``, else ``../shared/data/lee``."""
    return Path(os.environ.get(DIR_ENV) or REPO_DATA_DIR)


def _complete(directory: Path) -> bool:
    return all((directory / f).is_file() for f in FILES)


def lee_dir() -> Path:
    """A folder holding the three files: `local_lee_dir()` where it has them, else the gensim wheel's, extracted
    once into the llm2comp cache (each file written whole, then renamed: parallel test workers may race here)."""
    local = local_lee_dir()
    if _complete(local):
        return local
    out = cache_dir() / "lee"
    if not _complete(out):
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(pip_download("gensim", cache_dir() / "wheels")) as zf:
            for f in FILES:
                partial = out / f"{f}.{os.getpid()}.part"
                partial.write_bytes(zf.read(WHEEL_DIR + f))
                os.replace(partial, out / f)
    return out


def lee_files(data_dir: str | Path | None = None) -> dict[str, str]:
    """The three files' contents by name, from `data_dir`, else `lee_dir()`."""
    directory = Path(data_dir) if data_dir is not None else lee_dir()
    if not _complete(directory):
        raise FileNotFoundError(f"{directory} lacks one of {FILES}")
    return {f: _decode((directory / f).read_bytes()) for f in FILES}


def _decode(data: bytes) -> str:
    """UTF-8, else Latin-1: lee.cor is Latin-1 (its one non-ASCII character is a pound sign, byte 0xa3)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _documents(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_lee(data_dir: str | Path | None = None) -> LeeBenchmark:
    """The 50 documents and the 1225 rated pairs i < j."""
    files = lee_files(data_dir)
    documents = _documents(files["lee.cor"])
    matrix = [[float(x) for x in line.split()] for line in files["similarities0-1.txt"].splitlines() if line.strip()]
    n = len(documents)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"Lee data: {n} documents but a {len(matrix)}-row similarity matrix")
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return LeeBenchmark(documents, pairs, [matrix[i][j] for i, j in pairs])


def lee_background_documents(data_dir: str | Path | None = None) -> list[str]:
    """The 300 background documents of ``lee_background.cor`` (one per line)."""
    return _documents(lee_files(data_dir)["lee_background.cor"])
