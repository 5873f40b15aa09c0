"""General English training text from WordNet 3.0: one line per synset, ``lemmas: gloss. Examples.``

Source: the ``wordnet-base`` Debian package (Princeton WordNet 3.0, the WordNet 3.0 license: use, copy, modify
and distribute with its copyright notice), fetched like the quality suite's data (`llm2comp.data.debian`). About
117k lines over every part of speech and topic: the broad text the training recipes use, from a package mirror
where the paper's stage 2 reads a million Wikipedia sentences. It is training data only: no task of the quality
suite reads WordNet.
"""

from __future__ import annotations

import random
import re

from .debian import cached_json, deb_tree

__all__ = ["wordnet_texts"]

_PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")


def _synset_text(line: str) -> str | None:
    """``lemma, lemma: definition; definition. Example. Example.`` of one ``data.<pos>`` line (None: a license
    line)."""
    if line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    count = int(fields[3], 16)
    lemmas = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
    parts = [p.strip() for p in gloss.strip().split(";") if p.strip()]
    definitions = [p for p in parts if not p.startswith('"')]
    examples = [p.strip('"').strip() for p in parts if p.startswith('"')]
    text = f"{', '.join(lemmas[:3])}: {'; '.join(definitions)}."
    for example in filter(None, examples):
        text += " " + example[0].upper() + example[1:] + ("" if example[-1] in ".!?" else ".")
    return text


def _build() -> list[str]:
    root = deb_tree("wordnet-base") / "usr/share/wordnet"
    texts = []
    for pos in _PARTS_OF_SPEECH:
        with open(root / f"data.{pos}", encoding="latin-1") as fh:
            texts.extend(t for t in map(_synset_text, fh) if t)
    texts = sorted(set(texts))
    random.Random(0).shuffle(texts)  # parts of speech and topics mixed, the same order everywhere
    return texts


def wordnet_texts() -> list[str]:
    """Every WordNet synset as one line of text (about 117k), in a fixed shuffled order."""
    return cached_json("wordnet-v1", _build)
