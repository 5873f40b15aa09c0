"""The Lee data on a machine without ../shared/data: read from the gensim wheel on PyPI, never installed."""

import pytest

from llm2comp.data import lee


def test_falls_back_to_the_gensim_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(lee, "REPO_DATA_DIR", tmp_path / "no-shared-data")
    monkeypatch.delenv(lee.DIR_ENV, raising=False)
    monkeypatch.setenv("LLM2COMP_CACHE", str(tmp_path / "cache"))
    try:
        from_wheel = lee.lee_files()
    except RuntimeError as e:
        if "could not download" in str(e):
            pytest.skip(f"PyPI unreachable, cannot fetch the gensim wheel: {e}")
        raise
    assert list((tmp_path / "cache" / "wheels").glob("gensim-*.whl"))
    assert lee.lee_dir() == tmp_path / "cache" / "lee"  # the files, for what reads them by path (the tests' data)
    assert sorted(p.name for p in lee.lee_dir().iterdir()) == sorted(lee.FILES)
    monkeypatch.undo()
    assert from_wheel == lee.lee_files()  # the same files as ../shared/data/lee
    bench = lee.load_lee()
    assert len(bench.documents) == 50 and len(bench.pairs) == 1225
    assert len(lee.lee_background_documents()) == 300


def test_latin1_corpus_is_decoded(tmp_path):
    """lee.cor is Latin-1: its pound sign must come through, not as a replacement character."""
    for name, text in (("lee.cor", "A fine of \u00a33,000.\n"), ("lee_background.cor", "caf\u00e9\n"),
                       ("similarities0-1.txt", "1 0.5\n")):
        (tmp_path / name).write_bytes(text.encode("latin-1" if name == "lee.cor" else "utf-8"))
    files = lee.lee_files(tmp_path)
    assert files["lee.cor"] == "A fine of \u00a33,000.\n" and files["lee_background.cor"] == "caf\u00e9\n"
