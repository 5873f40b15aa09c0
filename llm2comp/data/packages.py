"""Stage-3 pairs from Debian's package descriptions: a package's one-line synopsis is the query, the first
paragraph of its long description the positive (``"Ruby parser written in pure Ruby"`` -> ``"ruby_parser (RP)
can be used to parse and check syntax of Ruby code. ..."``), a title -> passage task over every kind of software.

Source: ``Translation-en.xz`` of Debian 12 (bookworm) main, downloaded once from a Debian mirror (`MIRROR`, or
``$LLM2COMP_DEBIAN_MIRROR``; a ``file://`` URL works offline) into ``<cache>/debian``: about 64k descriptions,
written by the packages' maintainers and upstreams and distributed under their packages' licences (Debian main
holds only free software). The rows are in the format of the quality suite's man-page task (a one-line summary ->
a paragraph of 80-320 characters) but from another text: any row that contains a man-page query or shares a run
of `SHARED_WORDS` words with a man-page document is left out, so building them reads that task (apt-get, like
the rest of the suite's Debian data).
"""

from __future__ import annotations

import hashlib
import http.client
import lzma
import os
import re
import urllib.request
from pathlib import Path

from filelock import FileLock

from ..default_model import cache_dir
from .debian import cached_json
from .manpages import DOCUMENT_CHARS, cut_text, load_manpages

__all__ = ["package_pairs"]

MIRROR = "https://deb.debian.org/debian"
TRANSLATIONS = "dists/bookworm/main/i18n/Translation-en.xz"
PACKAGE_PAIRS = 1500
SHARED_WORDS = 8  # a row sharing this many words in a row with a man-page document is left out


def _translations() -> Path:
    """The downloaded ``Translation-en.xz``: fetched on first use, checked to decompress whole, then renamed into
    place (an interrupted or failed download leaves nothing behind)."""
    root = cache_dir() / "debian"
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bookworm-Translation-en.xz"
    with FileLock(root / ".translations.lock"):
        if path.is_file():
            return path
        url = f"{os.environ.get('LLM2COMP_DEBIAN_MIRROR', MIRROR).rstrip('/')}/{TRANSLATIONS}"
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            with lzma.open(partial) as check:  # a truncated file or an HTML page from a proxy fails here
                while check.read(1 << 24):
                    pass
        except (OSError, http.client.HTTPException, lzma.LZMAError, EOFError, ValueError) as exc:
            raise OSError(f"could not download {url} ({type(exc).__name__}: {exc}); set LLM2COMP_DEBIAN_MIRROR to "
                          f"another Debian mirror (a file:// URL works), or put the file at {path}") from exc
        else:
            partial.rename(path)
        finally:
            partial.unlink(missing_ok=True)  # after a failure or an interrupt; gone already after the rename
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
    """The first run of running text: leading `` .`` separators and indented (verbatim) lines are skipped, the
    next one ends it. A list written one space deep (``" * item"``) counts as running text."""
    words: list[str] = []
    for line in lines:
        if line.strip() == "." or line.startswith(" "):
            if words:
                break
            continue
        words.append(line.strip())
    return " ".join(" ".join(words).split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _runs(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + SHARED_WORDS]) for i in range(len(words) - SHARED_WORDS + 1)}


def _held_out_test():
    """``test(text) -> bool``: whether `text` contains a man-page query or shares a run of `SHARED_WORDS` words
    with a man-page document (words: lower-case letters and digits)."""
    pages = load_manpages()
    queries = [" ".join(_words(query)) for query in pages.queries]
    document_runs = set().union(*(_runs(_words(document)) for document in pages.documents))

    def test(text: str) -> bool:
        words = _words(text)
        joined = f" {' '.join(words)} "
        return any(f" {query} " in joined for query in queries) or not document_runs.isdisjoint(_runs(words))
    return test


def _build() -> list[dict[str, str]]:
    held_out = _held_out_test()
    seen: set[str] = set()
    rows = []
    for synopsis, lines in _descriptions(_translations()):
        positive = cut_text(_first_paragraph(lines), DOCUMENT_CHARS[1], DOCUMENT_CHARS[0])
        keys = (synopsis.lower(), positive.lower())
        if (len(synopsis.split()) < 3 or len(positive) < DOCUMENT_CHARS[0] or positive.startswith("This package")
                or any(k in seen for k in keys) or held_out(synopsis) or held_out(positive)):
            continue  # packaging boilerplate, variants of one package (-data, -doc: the same paragraph), eval text
        seen.update(keys)
        rows.append({"query": synopsis, "positive": positive})
    rows.sort(key=lambda row: hashlib.sha1(row["query"].encode()).hexdigest())  # a fixed, content-keyed draw
    return rows[:PACKAGE_PAIRS]


def package_pairs() -> list[dict[str, str]]:
    """`PACKAGE_PAIRS` (1500) stage-3 rows ``{"query": synopsis, "positive": first paragraph (80-320
    characters)}``: the usable descriptions with the smallest SHA-1 of their synopsis, a draw that depends on
    the text alone (a mirror's later copy of the file changes few rows). Kept in ``<cache>/tasks`` after the
    first call."""
    return cached_json(f"package-pairs-v1-{PACKAGE_PAIRS}-manpages-v1", _build)
