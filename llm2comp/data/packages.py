"""Stage-3 pairs from Debian's package descriptions: a package's one-line synopsis is the query, the first
paragraph of its long description the positive (``"Ruby parser written in pure Ruby"`` -> ``"ruby_parser (RP)
can be used to parse and check syntax of Ruby code. ..."``), a title -> passage task over every kind of software.

Source: ``Translation-en.xz`` of Debian 12 (bookworm) main, downloaded once from the Debian mirror
(`MIRROR`, ``$LLM2COMP_DEBIAN_MIRROR`` to change it) into the llm2comp cache: about 64k descriptions, written by
the packages' maintainers and upstreams and distributed under the licences of their packages (Debian's archive
holds only free software). No text equal to a query or document of the quality suite's man-page task is kept.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import urllib.request
from pathlib import Path

from filelock import FileLock

from ..default_model import cache_dir
from .debian import cached_json

__all__ = ["package_pairs"]

MIRROR = "https://deb.debian.org/debian"
TRANSLATIONS = "dists/bookworm/main/i18n/Translation-en.xz"
POSITIVE_CHARS = (80, 320)  # a longer first paragraph is cut at its last sentence (else word) end before 320
PACKAGE_PAIRS = 1500


def _translations() -> Path:
    """The downloaded ``Translation-en.xz`` (fetched whole on first use, then renamed into place)."""
    root = cache_dir() / "debian"
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bookworm-Translation-en.xz"
    with FileLock(root / ".translations.lock"):
        if not path.is_file():
            url = f"{os.environ.get('LLM2COMP_DEBIAN_MIRROR', MIRROR).rstrip('/')}/{TRANSLATIONS}"
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"could not download {url} ({exc}); set LLM2COMP_DEBIAN_MIRROR to another "
                                   f"Debian mirror, or put the file at {path}") from exc
            partial.rename(path)
    return path


def _descriptions(path: Path) -> list[tuple[str, list[str]]]:
    """``(synopsis, long description lines)`` of every record, in file order."""
    records: list[tuple[str, list[str]]] = []
    with lzma.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("Description-en: "):
                records.append((line[len("Description-en: "):].strip(), []))
            elif line.startswith(" ") and records:
                records[-1][1].append(line[1:].rstrip("\n"))
    return records


def _first_paragraph(lines: list[str]) -> str:
    """The first paragraph of running text: up to the first `` .`` separator or indented (verbatim) line."""
    words: list[str] = []
    for line in lines:
        if line.strip() == "." or line.startswith(" "):
            if words:
                break
            continue
        words.append(line.strip())
    return " ".join(" ".join(words).split())


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = head.rfind(". ")
    return head[:end + 1] if end >= POSITIVE_CHARS[0] else head[:head.rfind(" ")]


def _build() -> list[dict[str, str]]:
    from .manpages import load_manpages

    pages = load_manpages()
    held_out = {text.lower() for text in pages.queries + pages.documents}
    seen: set[str] = set()
    rows = []
    for synopsis, lines in _descriptions(_translations()):
        positive = _cut(_first_paragraph(lines), POSITIVE_CHARS[1])
        keys = (synopsis.lower(), positive.lower())
        if (len(synopsis.split()) < 3 or len(positive) < POSITIVE_CHARS[0] or positive.startswith("This package")
                or any(k in seen or k in held_out for k in keys)):
            continue  # packaging boilerplate, variants of one package (-data, -doc: the same paragraph), eval text
        seen.update(keys)
        rows.append({"query": synopsis, "positive": positive})
    rows.sort(key=lambda row: hashlib.sha1(row["query"].encode()).hexdigest())  # a fixed, content-keyed draw
    return rows[:PACKAGE_PAIRS]


def package_pairs() -> list[dict[str, str]]:
    """`PACKAGE_PAIRS` (1500) stage-3 rows ``{"query": synopsis, "positive": first paragraph (80-320
    characters)}``: the usable descriptions with the smallest SHA-1 of their synopsis, so the draw is the same
    on every machine and a mirror update changes few rows."""
    return cached_json(f"package-pairs-v1-{PACKAGE_PAIRS}", _build)
