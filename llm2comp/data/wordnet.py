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

__all__ = ["general_texts", "wordnet_texts"]

_PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
PASSAGE_CHARS = 450  # a passage ends once it is longer: about 100 tokens, the length of a Lee document
GENERAL_PASSAGES = 1200


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


def _synsets_by_topic() -> dict[str, list[str]]:
    """The synset texts of each lexicographer file (``noun.animal``, ``verb.motion``, ...: 45 topics), keyed by
    its number, in file order."""
    root = deb_tree("wordnet-base") / "usr/share/wordnet"
    topics: dict[str, list[str]] = {}
    for pos in _PARTS_OF_SPEECH:
        with open(root / f"data.{pos}", encoding="latin-1") as fh:
            for line in fh:
                text = _synset_text(line)
                if text:
                    topics.setdefault(line.split()[1], []).append(text)
    return topics


def _passages(rng: random.Random) -> list[str]:
    """The synsets of each topic, shuffled, joined into passages of just over `PASSAGE_CHARS` characters (a
    topic's last, shorter remainder is dropped); all passages shuffled (about 22k)."""
    passages = []
    for _, texts in sorted(_synsets_by_topic().items()):
        rng.shuffle(texts)
        current = ""
        for text in texts:
            current = f"{current} {text}".strip()
            if len(current) > PASSAGE_CHARS:
                passages.append(current)
                current = ""
    rng.shuffle(passages)
    return passages


def general_texts() -> list[str]:
    """The 300 Lee background news documents and `GENERAL_PASSAGES` WordNet passages (`_passages`), shuffled in
    a fixed order: news and dictionary English at the length of a document, the CPU recipe's corpus."""
    from .lee import lee_background_documents

    rng = random.Random(0)  # one generator for the passages and the mix: one fixed order
    passages = _passages(rng)
    texts = lee_background_documents() + passages[:GENERAL_PASSAGES]
    rng.shuffle(texts)
    return texts
