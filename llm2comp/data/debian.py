"""Files from Debian packages, fetched with ``apt-get download`` (no root, nothing installed) into the llm2comp
cache and unpacked there with ``dpkg-deb -x``: the source of the quality suite's fortunes, GCIDE and manual-page
tasks. Needs a Debian or Ubuntu machine whose apt lists are current (``apt-get update`` once, as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from filelock import FileLock

from ..default_model import cache_dir, fetched

__all__ = ["cached_json", "deb_tree"]


def deb_tree(package: str) -> Path:
    """The root of `package`'s unpacked files (``<root>/usr/share/...``), downloaded and unpacked on first use into
    ``<cache>/debian/<package>`` (one process at a time; the tree is renamed into place whole)."""
    root = cache_dir() / "debian"
    tree = root / package
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{package}.lock"):
        if not tree.is_dir():
            _unpack(_download(package, root / "debs"), tree)
    return tree


def _download(package: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None and not any(dest.glob(f"{package}_*.deb")):
        raise RuntimeError(f"the Debian package {package} is needed and there is no apt-get here: on another system "
                           f"fetch {package}'s .deb by hand into {dest}")
    return fetched(dest, f"{package}_*.deb", ["apt-get", "download", package],
                   f"could not download the Debian package {package} (apt-get download {package}; run apt-get "
                   "update first if apt has no package lists)")


def _unpack(deb: Path, tree: Path) -> None:
    partial = tree.with_name(f"{tree.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(f"dpkg-deb -x {deb.name} failed: {result.stderr.strip()[-2000:]}")
    partial.rename(tree)


def cached_json(name: str, build):
    """`build()`'s JSON-able result, kept as ``<cache>/tasks/<name>.json`` after the first call (written whole, then
    renamed): a task's fixed selection, so later runs skip the parsing. Put a version in `name` and bump it when
    the selection changes."""
    path = cache_dir() / "tasks" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)
    return value
