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
from typing import NamedTuple

from .debian import cached_json, deb_tree

__all__ = ["Synset", "general_pairs", "general_texts", "wordnet_texts"]

_PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
PASSAGE_CHARS = 450  # a passage ends once it is longer: about 100 tokens, the length of a Lee document
GENERAL_PASSAGES = 1200


class Synset(NamedTuple):
    """One WordNet synset: ``definition`` is ``lemma, lemma: definition; definition.``, ``examples`` its example
    sentences (capitalised, each ending with a stop)."""

    definition: str
    examples: tuple[str, ...]

    @property
    def text(self) -> str:
        """The definition and then the examples: the synset as one line of training text."""
        return " ".join((self.definition, *self.examples))


def _synset(line: str) -> Synset | None:
    """The synset of one ``data.<pos>`` line (None: a license line)."""
    if line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    count = int(fields[3], 16)
    lemmas = [re.sub(r"\(\w+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count)]
    parts = [p.strip() for p in gloss.strip().split(";") if p.strip()]
    definitions = [p for p in parts if not p.startswith('"')]
    examples = [p.strip('"').strip() for p in parts if p.startswith('"')]
    return Synset(f"{', '.join(lemmas[:3])}: {'; '.join(definitions)}.",
                  tuple(e[0].upper() + e[1:] + ("" if e[-1] in ".!?" else ".") for e in examples if e))


def _build() -> list[str]:
    root = deb_tree("wordnet-base") / "usr/share/wordnet"
    texts = []
    for pos in _PARTS_OF_SPEECH:
        with open(root / f"data.{pos}", encoding="latin-1") as fh:
            texts.extend(synset.text for synset in map(_synset, fh) if synset)
    texts = sorted(set(texts))
    random.Random(0).shuffle(texts)  # parts of speech and topics mixed, the same order everywhere
    return texts


def wordnet_texts() -> list[str]:
    """Every WordNet synset as one line of text (about 117k), in a fixed shuffled order."""
    return cached_json("wordnet-v1", _build)


def _synsets_by_topic() -> dict[str, list[Synset]]:
    """The synsets of each lexicographer file (``noun.animal``, ``verb.motion``, ...: 45 topics), keyed by its
    number, in file order."""
    root = deb_tree("wordnet-base") / "usr/share/wordnet"
    topics: dict[str, list[Synset]] = {}
    for pos in _PARTS_OF_SPEECH:
        with open(root / f"data.{pos}", encoding="latin-1") as fh:
            for line in fh:
                synset = _synset(line)
                if synset:
                    topics.setdefault(line.split()[1], []).append(synset)
    return topics


def _passages(rng: random.Random) -> list[list[Synset]]:
    """The synsets of each topic, shuffled, grouped into passages of just over `PASSAGE_CHARS` characters of
    text (a topic's last, shorter remainder is dropped); all passages shuffled (about 22k)."""
    passages = []
    for _, synsets in sorted(_synsets_by_topic().items()):
        rng.shuffle(synsets)
        current: list[Synset] = []
        for synset in synsets:
            current.append(synset)
            if len(_joined(current)) > PASSAGE_CHARS:
                passages.append(current)
                current = []
    rng.shuffle(passages)
    return passages


def _joined(synsets: list[Synset]) -> str:
    return " ".join(synset.text for synset in synsets)


def _general_corpus(rng: random.Random) -> tuple[list[str], list[list[Synset]]]:
    """The Lee background news documents and the first `GENERAL_PASSAGES` WordNet passages (`_passages`)."""
    from .lee import lee_background_documents

    return lee_background_documents(), _passages(rng)[:GENERAL_PASSAGES]


def general_texts() -> list[str]:
    """The 300 Lee background news documents and `GENERAL_PASSAGES` WordNet passages, shuffled in a fixed order:
    news and dictionary English at the length of a document, the CPU recipe's corpus."""
    rng = random.Random(0)  # one generator for the passages and the mix: one fixed order
    news, passages = _general_corpus(rng)
    texts = news + [_joined(passage) for passage in passages]
    rng.shuffle(texts)
    return texts


_SENTENCE_END = re.compile(r'(?<=[.!?"])\s+(?=["A-Z])')


def _first_sentence(document: str) -> tuple[str, str] | None:
    """``(first sentence, the rest)`` of a news document; None when it has a single sentence."""
    parts = _SENTENCE_END.split(document.strip(), maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else None


def general_pairs() -> list[dict[str, str]]:
    """Stage-3 rows ``{"query", "positive"}`` cut from the general corpus itself (an inverse cloze task: a short
    piece of a text is the query, the rest of that text its positive): a news document's first sentence -> the
    rest of the document; one synset's definition (no examples) -> the other synsets of its passage. A document
    of one sentence and a passage of one synset have no rest and give no row. In a fixed shuffled order; no hard
    negatives (the batch's other rows are the negatives)."""
    news, passages = _general_corpus(random.Random(0))
    rng = random.Random(1)
    pairs = [{"query": query, "positive": rest} for query, rest in filter(None, map(_first_sentence, news))]
    for passage in passages:
        k = rng.randrange(len(passage))
        pairs.append({"query": passage[k].definition, "positive": _joined(passage[:k] + passage[k + 1:])})
    rng.shuffle(pairs)
    return [pair for pair in pairs if pair["positive"]]
