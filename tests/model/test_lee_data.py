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
    monkeypatch.undo()
    assert from_wheel == lee.lee_files()  # the same files as ../shared/data/lee
    bench = lee.load_lee()
    assert len(bench.documents) == 50 and len(bench.pairs) == 1225
    assert len(lee.lee_background_documents()) == 300
