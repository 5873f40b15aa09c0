"""Retrieval over Linux manual pages: a page's one-line NAME summary is the query, the first paragraph of its
DESCRIPTION the one relevant document.

Source: the ``manpages`` and ``manpages-dev`` Debian packages (the Linux man-pages project, sections 1-8; each
page under its own free licence, mostly ``Linux-man-pages-copyleft``, see the packages' copyright files).
The groff markup is reduced to plain text by `roff_text` (fonts, escapes and request lines).
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass

from .debian import cached_json, deb_tree
from .labeled import pick

__all__ = ["ManPageRetrieval", "cut_text", "load_manpages", "roff_text"]

PACKAGES = ("manpages", "manpages-dev")
NUM_PAGES = 160
DOCUMENT_CHARS = (80, 320)  # a longer first paragraph is cut at its last sentence (else word) end before 320

_ESCAPES = {r"\-": "-", r"\(em": "-", r"\(en": "-", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"', r"\(rq": '"',
            r"\(bu": "*", r"\e": "\\", r"\~": " ", r"\ ": " ", r"\0": " ", r"\&": "", r"\c": "", r"\%": "",
            r"\:": "", r"\/": "", r"\,": "", r"\|": "", r"\^": ""}
_ESCAPE = re.compile("|".join(re.escape(e) for e in sorted(_ESCAPES, key=len, reverse=True)))
_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}  # their arguments join without spaces
_FONT_REQUESTS = {"B", "I", "SM", "SB", *_ALTERNATING}


@dataclass(frozen=True)
class ManPageRetrieval:
    """queries[i] (a NAME summary) has exactly one relevant document, documents[relevant[i]]; pages[i] names it."""

    queries: list[str]
    documents: list[str]
    relevant: list[int]
    pages: list[str]


def _arguments(line: str) -> list[str]:
    return [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', line)]


def roff_text(lines: list[str]) -> str:
    """Plain text of groff source lines: font requests keep their arguments, other requests and comments drop."""
    words = []
    for line in lines:
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request not in _FONT_REQUESTS:
                continue
            line = ("" if request in _ALTERNATING else " ").join(_arguments(rest))
        line = _ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], _FONT.sub("", line))
        words.append(re.sub(r"\\\S", "", line))
    return " ".join(" ".join(words).split())


def _sections(source: str) -> dict[str, list[str]]:
    """The lines of each ``.SH`` section, by upper-case title."""
    sections, current = {}, None
    for line in source.splitlines():
        if line.startswith(".SH"):
            current = " ".join(_arguments(line[3:])).upper()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def _first_paragraph(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if re.match(r"\.(PP|P|LP|TP|IP|SS|nf|EX|TS|in)\b", line):
            if any(not x.startswith((".", "'")) for x in out):
                break
            continue
        out.append(line)
    return out


def cut_text(text: str, limit: int, shortest: int) -> str:
    """`text` if it is at most `limit` characters, else its head cut at the last sentence end (``". "`` or
    ``".) "``) at or after `shortest` characters, else at the last word end."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind(".) "))
    return head[:end + 1] if end >= shortest else head[:head.rfind(" ")]


def _page(source: str) -> tuple[str, str] | None:
    """``(summary, first description paragraph)`` of one page, or None (a ``.so`` link, no usable sections)."""
    sections = _sections(source)
    name, description = roff_text(sections.get("NAME", [])), sections.get("DESCRIPTION")
    if " - " not in name or not description:
        return None
    summary = name.split(" - ", 1)[1].strip()
    document = cut_text(roff_text(_first_paragraph(description)), DOCUMENT_CHARS[1], DOCUMENT_CHARS[0])
    if len(summary.split()) < 3 or len(document) < DOCUMENT_CHARS[0]:
        return None
    return summary, document


def _build() -> dict:
    pages = {}
    for package in PACKAGES:
        for path in sorted((deb_tree(package) / "usr" / "share" / "man").glob("man*/*.gz")):
            if path.is_file() and not path.is_symlink():
                parsed = _page(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
                if parsed:
                    pages[path.name.removesuffix(".gz")] = parsed
    # a summary or document shared by two pages (variants of one call) would make the one relevant page ambiguous
    counts: dict[str, int] = {}
    for summary, document in pages.values():
        counts[summary] = counts.get(summary, 0) + 1
        counts[document] = counts.get(document, 0) + 1
    names = pick([n for n, (s, d) in pages.items() if counts[s] == 1 and counts[d] == 1], NUM_PAGES, "manpages")
    return {"queries": [pages[n][0] for n in names], "documents": [pages[n][1] for n in names],
            "relevant": list(range(len(names))), "pages": names}


def load_manpages() -> ManPageRetrieval:
    """`NUM_PAGES` (160) pages chosen among every usable page of `PACKAGES`: a query and a document (80-320
    characters) each."""
    return ManPageRetrieval(**cached_json(f"manpages-v1-{NUM_PAGES}", _build))
