"""Fixed-size labelled text sets of the quality suite: Debian fortune files by topic, GCIDE definitions by field.

Fortunes: the ``fortunes`` Debian package (fortune-mod's data files; BSD-3-Clause, see its copyright file), one
file per topic. GCIDE: the ``dict-gcide`` Debian package (the GNU Collaborative International Dictionary of
English 0.48, GPL-2.0-or-later); only definitions marked ``[1913 Webster]`` are used (GCIDE also carries WordNet
entries, which are kept for training). Selections are deterministic: filter, then `pick` by hash.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass

from .debian import cached_json, deb_tree

__all__ = ["FORTUNE_TOPICS", "GCIDE_FIELDS", "LabeledTexts", "load_fortunes", "load_gcide", "pick"]

FORTUNE_TOPICS = ("computers", "food", "law", "love", "medicine", "politics", "science", "sports")
FORTUNES_PER_TOPIC = 40  # the first half of each topic's texts trains the probe, the second half tests it
FORTUNE_CHARS = (40, 240)
# GCIDE's field labels, as written in the definitions: "(Bot.)" etc.
GCIDE_FIELDS = ("Arch.", "Astron.", "Bot.", "Chem.", "Law", "Med.", "Mil.", "Mus.", "Naut.", "Zool.")
DEFINITIONS_PER_FIELD = 20
DEFINITION_CHARS = (40, 240)


@dataclass(frozen=True)
class LabeledTexts:
    """texts[i] has label labels[i]; split[i] is "train" or "test" (all "test" where the task needs no split)."""

    texts: list[str]
    labels: list[str]
    split: list[str]


def pick(candidates: list[str], n: int, what: str) -> list[str]:
    """`n` of the distinct `candidates`: those with the smallest SHA-1 of their text, in that order (a shuffle
    that depends on no random generator, library version or input order)."""
    pool = sorted(set(candidates), key=lambda t: hashlib.sha1(t.encode("utf-8")).hexdigest())
    if len(pool) < n:
        raise ValueError(f"{what}: {len(pool)} usable texts, fewer than the {n} the task takes")
    return pool[:n]


def _fortunes(text: str) -> list[str]:
    """The fortunes of a fortune file (separated by ``%`` lines), whitespace collapsed."""
    items = (" ".join(chunk.split()) for chunk in re.split(r"^%$", text, flags=re.M))
    return [t for t in items if FORTUNE_CHARS[0] <= len(t) <= FORTUNE_CHARS[1]]


def _build_fortunes() -> dict:
    directory = deb_tree("fortunes") / "usr" / "share" / "games" / "fortunes"
    by_topic = {t: _fortunes((directory / t).read_text(encoding="utf-8", errors="replace")) for t in FORTUNE_TOPICS}
    seen: dict[str, int] = {}
    for texts in by_topic.values():
        for t in set(texts):
            seen[t] = seen.get(t, 0) + 1
    texts, labels, split = [], [], []
    for topic, candidates in by_topic.items():
        chosen = pick([t for t in candidates if seen[t] == 1], FORTUNES_PER_TOPIC, f"fortunes/{topic}")
        texts += chosen
        labels += [topic] * len(chosen)
        split += ["train"] * (len(chosen) // 2) + ["test"] * (len(chosen) - len(chosen) // 2)
    return {"texts": texts, "labels": labels, "split": split}


def load_fortunes() -> LabeledTexts:
    """320 fortunes (40-240 characters), 40 from each of the 8 `FORTUNE_TOPICS` files: 20 train + 20 test each."""
    return LabeledTexts(**cached_json(f"fortunes-v1-{FORTUNES_PER_TOPIC}", _build_fortunes))


_MARKER = "[1913 Webster]"
_CITATION = re.compile(r"--\s?[A-Z][\w'.]*(?:\s(?:[A-Z&][\w'.]*|of|and|in|de))*\.?")
_FIELD = re.compile(r"\((" + "|".join(re.escape(f) for f in GCIDE_FIELDS) + r")\)")


def _clean_definition(text: str) -> str:
    text = _CITATION.sub("", text)
    text = re.sub(r"[{}]", "", text)
    text = re.sub(r"\[[^\]\s]{1,4}\]", "", text)  # accent codes such as [e^]
    return " ".join(text.split()).strip(" ;,")


def _definitions(dictionary: str) -> dict[str, list[str]]:
    """Every 1913 Webster definition that carries exactly one of `GCIDE_FIELDS`, cleaned, by field."""
    by_field: dict[str, list[str]] = {f: [] for f in GCIDE_FIELDS}
    for block in dictionary.split("\n\n"):
        if not block.rstrip().endswith(_MARKER) or block.count(_MARKER) != 1 or "WordNet" in block:
            continue
        fields = _FIELD.findall(block)
        if len(fields) != 1:
            continue
        text = _clean_definition(block[block.index(f"({fields[0]})") + len(fields[0]) + 2:block.rindex(_MARKER)])
        if DEFINITION_CHARS[0] <= len(text) <= DEFINITION_CHARS[1] and len(text.split()) >= 6:
            by_field[fields[0]].append(text)
    return by_field


def _build_gcide() -> dict:
    path = deb_tree("dict-gcide") / "usr" / "share" / "dictd" / "gcide.dict.dz"
    by_field = _definitions(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
    texts, labels = [], []
    for field, candidates in by_field.items():
        chosen = pick(candidates, DEFINITIONS_PER_FIELD, f"gcide/{field}")
        texts += chosen
        labels += [field.rstrip(".")] * len(chosen)
    return {"texts": texts, "labels": labels, "split": ["test"] * len(texts)}


def load_gcide() -> LabeledTexts:
    """200 dictionary definitions (40-240 characters), 20 from each of the 10 `GCIDE_FIELDS`."""
    return LabeledTexts(**cached_json(f"gcide-v1-{DEFINITIONS_PER_FIELD}", _build_gcide))
