"""Training corpora: the WordNet line format, the ``llm2comp data`` command, and the ablation table renderer."""

import hashlib
import json
import lzma

import pytest

from llm2comp.cli import main
from llm2comp.data import wordnet

NOUN = ("00006269 03 n 01 life 0 002 @ 00004258 n 0000 ~ 07993776 n 0000 | living things collectively; "
        '"the oceans are teeming with life"  \n')
VERB = ("00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 | draw air into, and expel out of, "
        'the lungs; "I can breathe better when the air is clean"; "The patient is respiring"  \n')


def test_synset_lines_become_lemmas_definition_and_examples():
    assert wordnet._synset(NOUN).text == "life: living things collectively. The oceans are teeming with life."
    verb = wordnet._synset(VERB)
    assert verb.definition == "breathe, take a breath, respire: draw air into, and expel out of, the lungs."
    assert verb.text == ("breathe, take a breath, respire: draw air into, and expel out of, the lungs. I can "
                         "breathe better when the air is clean. The patient is respiring.")
    assert wordnet._synset("  1 This software and database is being provided to you\n") is None


def test_data_command_writes_one_text_per_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wordnet, "wordnet_texts", lambda: ["first text", "second text", "third"])
    out = tmp_path / "corpus.txt"
    assert main(["data", "wordnet", str(out), "--limit", "2"]) == 0
    assert out.read_text() == "first text\nsecond text\n"
    assert "wrote 2 texts" in capsys.readouterr().out
    assert main(["data", "wordnet", str(tmp_path / "missing" / "x.txt")]) == 2
    assert "output folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "wikipedia", str(out)])


def test_ablation_table_is_mean_and_std_over_seeds(tmp_path):
    from benchmarks import quality_ablation

    lines = [{"variant": "kl + SimCSE", "seed": s, "lee": {"pearson": p, "spearman": p / 2}}
             for s, p in ((0, 0.5), (1, 0.7))]
    lines.append({"variant": "SimCSE alone", "seed": 0, "lee": {"pearson": 0.4, "spearman": 0.1}})
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = quality_ablation.render(results, tmp_path / "doc.md")
    assert "| kl + SimCSE (the paper's recipe (every hand-off choice on)) | 0, 1 | 0.600 ± 0.141 | 0.300 ± 0.071 |" \
        in text
    assert "| SimCSE alone (no stage 1; its steps go to SimCSE) | 0 | 0.400 | 0.100 |" in text
    assert (tmp_path / "doc.md").read_text() == text


LONE_STORY = "A lone story of one sentence."
LONG_GLOSS = "a noun thing of topic 07 alone in its passage, " * 10  # one synset over PASSAGE_CHARS


@pytest.fixture
def fake_general(monkeypatch, tmp_path):
    """A wordnet-base tree of two topics x 40 synsets per part of speech and a topic of one long synset; five
    two-sentence news documents and one of a single sentence."""
    root = tmp_path / "usr/share/wordnet"
    root.mkdir(parents=True)
    for pos in ("noun", "verb", "adj", "adv"):
        lines = ["  1 This software and database is being provided to you\n"]
        for topic in ("05", "06"):
            for i in range(40):
                gloss = f'a {pos} thing of topic {topic} number {i} described at some length; "an example {i}"'
                lines.append(f"{i:08d} {topic} n 01 w{topic}x{i} 0 000 | {gloss}\n")
        if pos == "noun":
            lines.append(f"00000099 07 n 01 w07 0 000 | {LONG_GLOSS}\n")
        (root / f"data.{pos}").write_text("".join(lines), encoding="latin-1")
    monkeypatch.setattr(wordnet, "deb_tree", lambda package: tmp_path)
    monkeypatch.setattr("llm2comp.data.lee.lee_background_documents",
                        lambda: [f"Lead of story {i}. The rest of story {i} follows." for i in range(5)] + [LONE_STORY])


def _is_news(text: str) -> bool:
    return text.startswith("Lead of story") or text == LONE_STORY


def test_general_corpus_joins_one_topic_per_passage(fake_general):
    texts = wordnet.general_texts()
    assert texts == wordnet.general_texts()  # a fixed order
    news = [t for t in texts if _is_news(t)]
    passages = [t for t in texts if not _is_news(t)]
    assert len(news) == 6 and passages
    for passage in passages:
        assert len(passage) > wordnet.PASSAGE_CHARS
        assert len({word for word in passage.split() if word in ("05", "06", "07")}) == 1  # one topic each


def test_general_pairs_cut_a_query_from_each_text(fake_general, tmp_path, capsys):
    texts = wordnet.general_texts()
    pairs = wordnet.general_pairs()
    # the lone story and the passage of one synset have no rest: no row
    assert any(LONG_GLOSS.strip() in t for t in texts) and LONE_STORY in texts
    assert pairs == wordnet.general_pairs() and len(pairs) == len(texts) - 2
    for row in pairs:
        if row["query"].startswith("Lead of story"):
            story = row["query"].split()[-1].rstrip(".")
            assert row == {"query": f"Lead of story {story}.", "positive": f"The rest of story {story} follows."}
            continue
        # a definition without its example, its passage's other synsets as the positive
        assert row["query"].endswith("described at some length.") and "an example" not in row["query"]
        whole = next(t for t in texts if row["query"] in t)
        example = row["query"].split(" number ")[1].split()[0]
        assert whole.replace(f"{row['query']} An example {example}.", "").split() == row["positive"].split()
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "general-pairs", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == pairs
    assert f"wrote {len(pairs)} rows" in capsys.readouterr().out
    from llm2comp.training.rows import read_pairs
    rows, _ = read_pairs(out, num_negatives=0)
    assert [(r.query, r.positive, r.negatives) for r in rows] == [(p["query"], p["positive"], ()) for p in pairs]
    assert main(["data", "general-pairs", str(out), "--limit", "3"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == pairs[:3]
    assert main(["data", "general-pairs", str(tmp_path / "pairs.txt")]) == 2
    assert "name a .jsonl file" in capsys.readouterr().err



def _record(package: str, synopsis: str, *lines: str) -> str:
    body = "".join(f" {line}\n" for line in lines)
    return f"Package: {package}\nDescription-md5: 0\nDescription-en: {synopsis}\n{body}\n"


LONG = " ".join(["Epsilon does one thing well and then another thing."] * 8)  # 415 characters
ALPHA_TEXT = "Alpha sorts the lines of large text files quickly, in little memory. It reads standard input too."
TRANSLATIONS = "".join([
    _record("alpha", "fast tool to sort lines of text", ALPHA_TEXT, ".", "A second paragraph that is never read."),
    _record("alpha-doc", "documentation for the alpha line sorter", ALPHA_TEXT),  # a variant: the same paragraph
    _record("beta", "short synopsis", "A paragraph long enough to keep; only the synopsis, of two words, is too "
                                      "short to be a query."),
    _record("gamma", "library for reading the gamma image format",
            "This package contains the shared library: a packaging boilerplate line, long enough to keep."),
    _record("delta", "helper to synchronize a file's state with the disk",  # holds a man-page query
            "Delta flushes the buffers of a file to the disk, and waits until the device reports that it is done."),
    _record("zeta", "tool that shares eight words with a man page",
            "Zeta copies text: one two three four five six seven eight, then its own words to pass the length."),
    _record("eta", "tool that shares seven words with a man page",
            "Eta copies text: one two three four five six seven, then its own different words to pass the length."),
    _record("epsilon", "long running text cut at a sentence end", LONG),
    _record("theta", "tool whose paragraph stops at a verbatim line",
            "Theta runs a command and prints its output, then exits with the status of that command, always.",
            " $ theta --run ls", "More running text after the example that is not part of the first paragraph."),
])
MAN_PAGES = (["synchronize a file's state"], ["one two three four five six seven eight nine ten eleven"])


@pytest.fixture
def fake_translations(tmp_path, monkeypatch):
    """A mirror (file:// URL) holding `TRANSLATIONS`, an empty cache, and a man-page task of `MAN_PAGES`."""
    from llm2comp.data import manpages, packages

    mirror = tmp_path / "mirror"
    (mirror / packages.TRANSLATIONS).parent.mkdir(parents=True)
    (mirror / packages.TRANSLATIONS).write_bytes(lzma.compress(TRANSLATIONS.encode()))
    monkeypatch.setenv("LLM2COMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM2COMP_DEBIAN_MIRROR", mirror.as_uri())
    queries, documents = MAN_PAGES
    monkeypatch.setattr(packages, "load_manpages",
                        lambda: manpages.ManPageRetrieval(queries, documents, [0], ["x.2"]))
    return mirror / packages.TRANSLATIONS


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def test_package_pairs_keep_synopsis_and_first_paragraph(fake_translations, tmp_path):
    from llm2comp.data import packages

    rows = packages.package_pairs()
    by_query = {row["query"]: row["positive"] for row in rows}
    assert by_query["fast tool to sort lines of text"] == ALPHA_TEXT  # the first paragraph only
    assert by_query["tool whose paragraph stops at a verbatim line"].endswith("the status of that command, always.")
    epsilon = by_query["long running text cut at a sentence end"]
    assert len(epsilon) <= 320 and epsilon.endswith("another thing.") and LONG.startswith(epsilon)
    assert "tool that shares seven words with a man page" in by_query
    for dropped in ("documentation for the alpha line sorter", "short synopsis",
                    "library for reading the gamma image format", "helper to synchronize a file's state with the disk",
                    "tool that shares eight words with a man page"):
        assert dropped not in by_query
    queries = [row["query"] for row in rows]
    assert len(rows) == 4 and queries == sorted(queries, key=_sha1)
    file_order = sorted(queries, key=TRANSLATIONS.index)
    assert file_order != queries  # the order is the hash's, not the file's
    fake_translations.unlink()
    (tmp_path / "cache" / "debian" / "bookworm-Translation-en.xz").unlink()
    assert packages.package_pairs() == rows  # read back from the cache, nothing downloaded


def test_package_pairs_take_the_smallest_hashes(fake_translations, monkeypatch):
    from llm2comp.data import packages

    every = packages.package_pairs()
    monkeypatch.setattr(packages, "PACKAGE_PAIRS", 2)
    assert packages.package_pairs() == every[:2]


def test_package_pairs_command_writes_jsonl(fake_translations, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "package-pairs", str(out), "--limit", "2"]) == 0
    from llm2comp.data import packages
    assert [json.loads(line) for line in out.read_text().splitlines()] == packages.package_pairs()[:2]
    assert "wrote 2 rows" in capsys.readouterr().out
    assert main(["data", "package-pairs", str(tmp_path / "pairs.txt")]) == 2
    assert "package-pairs writes jsonl rows" in capsys.readouterr().err


class _BrokenResponse:
    """A response that gives one chunk of `body`, then fails as a dropped connection does (or ends, if `fail`
    is False)."""

    def __init__(self, body: bytes, fail: bool):
        self.chunks, self.fail = [body], fail

    def read(self, size):
        if self.chunks:
            return self.chunks.pop()
        if self.fail:
            import http.client
            raise http.client.IncompleteRead(b"")
        return b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("body, fail", [(b"\xfd7zXZ\x00 the first bytes of an xz file", True),
                                        (b"<html>a proxy's login page</html>", False),
                                        (lzma.compress(TRANSLATIONS.encode())[:100], False)])
def test_a_failed_download_leaves_nothing_and_names_the_mirror(fake_translations, tmp_path, monkeypatch, capsys,
                                                              body, fail):
    from llm2comp.data import packages

    monkeypatch.setattr(packages.urllib.request, "urlopen", lambda url, timeout: _BrokenResponse(body, fail))
    with pytest.raises(OSError, match="LLM2COMP_DEBIAN_MIRROR"):
        packages.package_pairs()
    assert [p.name for p in (tmp_path / "cache" / "debian").iterdir()] == [".translations.lock"]
    assert main(["data", "package-pairs", str(tmp_path / "pairs.jsonl")]) == 2  # one line, no traceback
    assert "could not download" in capsys.readouterr().err
