"""sentence-transformers' encode options on LLM2Comp: prompts, truncate_dim, precision, encode_query/document."""

import json

import numpy as np
import pytest
import torch

from llm2comp import LLM2Comp
from llm2comp.model import CONFIG_NAME
from llm2comp.quantization import PRECISIONS, quantize_embeddings

TEXTS = ["a cat sat on the mat", "stocks fell sharply today", "the rain in spain", "x", "a longer sentence " * 5]


def test_quantization_matches_sentence_transformers():
    st_quantize = pytest.importorskip("sentence_transformers.util").quantize_embeddings
    rng = np.random.default_rng(0)
    for dim in (16, 13):  # 13: the packed bits end in a partial byte
        x = rng.standard_normal((7, dim)).astype(np.float32)
        x[:, 0] = 0.5  # a dimension without range: step 1
        for precision in PRECISIONS:
            ours, theirs = quantize_embeddings(x, precision), st_quantize(x, precision=precision)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, precision
            np.testing.assert_array_equal(ours, theirs, err_msg=precision)
        ranges = np.vstack([x.min(0) - 1, x.max(0) + 1])
        np.testing.assert_array_equal(quantize_embeddings(x, "int8", ranges=ranges),
                                      st_quantize(x, precision="int8", ranges=ranges))


def test_quantization_by_hand():
    x = np.array([[-1.0, 0.0, 2.0, 0.1, -0.2, 3.0, 1.0, -4.0, 0.3], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]])
    packed = quantize_embeddings(x, "ubinary")
    assert packed.tolist() == [[0b00110110, 0b10000000], [0b11000000, 0]]
    assert quantize_embeddings(x, "binary").tolist() == [[0b00110110 - 128, 0], [0b11000000 - 128, -128]]
    u = quantize_embeddings(x, "uint8")
    assert u[0, 0] == 0 and u[1, 0] >= 254 and u.dtype == np.uint8  # the max lands on 255 up to rounding
    assert (quantize_embeddings(x, "int8").astype(int) == u.astype(int) - 128).all()


def test_quantization_errors():
    with pytest.raises(ValueError, match="precision must be one of"):
        quantize_embeddings(np.zeros((2, 4)), "int4")
    with pytest.raises(ValueError, match="more than one"):
        quantize_embeddings(np.zeros((1, 4)), "int8")
    with pytest.raises(ValueError, match=r"ranges must be \[2, 4\]"):
        quantize_embeddings(np.zeros((3, 4)), "uint8", ranges=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="float"):
        quantize_embeddings(np.zeros((2, 4), dtype=np.int8), "int8")


def test_truncate_dim_then_normalize(tiny_encoder):
    full = tiny_encoder.encode(TEXTS)
    cut = tiny_encoder.encode(TEXTS, truncate_dim=8, normalize_embeddings=True)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, rtol=1e-5, atol=1e-6)
    tiny_encoder.truncate_dim = 8  # the model's default
    assert tiny_encoder.encode(TEXTS).shape == (len(TEXTS), 8)
    assert tiny_encoder.encode(TEXTS[0]).shape == (8,)
    assert tiny_encoder.encode(TEXTS, truncate_dim=4).shape == (len(TEXTS), 4)
    for bad, error in ((0, ValueError), (tiny_encoder.hidden_size + 1, ValueError), (2.0, TypeError)):
        with pytest.raises(error, match="truncate_dim"):
            tiny_encoder.encode(TEXTS, truncate_dim=bad)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_is_quantize_embeddings_of_the_float_embeddings(tiny_encoder, precision):
    full = tiny_encoder.encode(TEXTS, normalize_embeddings=True)
    out = tiny_encoder.encode(TEXTS, normalize_embeddings=True, precision=precision)
    np.testing.assert_array_equal(out, quantize_embeddings(full, precision))
    as_tensor = tiny_encoder.encode(TEXTS, normalize_embeddings=True, precision=precision, convert_to_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and (as_tensor.numpy() == out).all()


def test_precision_errors(tiny_encoder):
    with pytest.raises(ValueError, match="precision must be one of"):
        tiny_encoder.encode(TEXTS, precision="fp8")
    with pytest.raises(ValueError, match="more than one"):
        tiny_encoder.encode(TEXTS[0], precision="int8")
    assert tiny_encoder.encode(TEXTS[0], precision="ubinary").dtype == np.uint8
    assert tiny_encoder.encode([], precision="int8").shape == (0, tiny_encoder.hidden_size)
    empty = tiny_encoder.encode([], precision="binary")
    assert empty.shape == (0, -(-tiny_encoder.hidden_size // 8)) and empty.dtype == np.int8


def test_prompts_by_name_and_default(tiny_encoder):
    query = "Instruct: find the answer\nQuery: "
    by_instruction = tiny_encoder.encode(TEXTS, instruction=query)
    tiny_encoder.prompts = {"query": query, "document": ""}
    np.testing.assert_allclose(tiny_encoder.encode(TEXTS, prompt_name="query"), by_instruction, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiny_encoder.encode(TEXTS, prompt=query), by_instruction, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiny_encoder.encode_query(TEXTS), by_instruction, rtol=1e-5, atol=1e-6)
    plain = tiny_encoder.encode(TEXTS)
    np.testing.assert_allclose(tiny_encoder.encode_document(TEXTS), plain, rtol=1e-5, atol=1e-6)
    tiny_encoder.default_prompt_name = "query"
    np.testing.assert_allclose(tiny_encoder.encode(TEXTS), by_instruction, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiny_encoder.encode_document(TEXTS), plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prompt_name 'passage' is not one of the model's prompts"):
        tiny_encoder.encode(TEXTS, prompt_name="passage")
    with pytest.raises(ValueError, match="not both"):
        tiny_encoder.encode(TEXTS, prompt="a: ", instruction="b: ")
    with pytest.warns(UserWarning, match="prompt_name 'query' is ignored"):
        tiny_encoder.encode(TEXTS[:1], prompt_name="query", prompt="")


def test_a_role_without_its_prompt_gets_none_not_the_default(tiny_encoder):
    tiny_encoder.prompts, tiny_encoder.default_prompt_name = {"query": "Query: "}, "query"
    plain = tiny_encoder.encode(TEXTS, prompt="")
    assert not np.allclose(plain, tiny_encoder.encode(TEXTS))  # the default prompt applies to encode
    np.testing.assert_allclose(tiny_encoder.encode_document(TEXTS), plain, rtol=1e-5, atol=1e-6)
    tiny_encoder.prompts, tiny_encoder.default_prompt_name = {"document": "Doc: "}, "document"
    np.testing.assert_allclose(tiny_encoder.encode_query(TEXTS), plain, rtol=1e-5, atol=1e-6)


def test_quantizing_a_bfloat16_tensor():
    x = torch.randn(4, 16)
    np.testing.assert_array_equal(quantize_embeddings(x.bfloat16(), "int8"), quantize_embeddings(x.bfloat16().float(),
                                                                                                 "int8"))


def test_encode_document_picks_passage_then_corpus(tiny_encoder):
    tiny_encoder.prompts = {"corpus": "Corpus: ", "passage": "Passage: "}
    np.testing.assert_allclose(tiny_encoder.encode_document(TEXTS), tiny_encoder.encode(TEXTS, prompt="Passage: "),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiny_encoder.encode_document(TEXTS, prompt="Other: "),
                               tiny_encoder.encode(TEXTS, prompt="Other: "), rtol=1e-5, atol=1e-6)


def test_encode_defaults_are_saved_loaded_and_overridden(tiny_encoder, tmp_path):
    tiny_encoder.prompts, tiny_encoder.default_prompt_name = {"query": "Query: "}, "query"
    tiny_encoder.truncate_dim = 6
    tiny_encoder.save_pretrained(tmp_path / "m")
    loaded = LLM2Comp.from_pretrained(str(tmp_path / "m"))
    assert (loaded.prompts, loaded.default_prompt_name, loaded.truncate_dim) == ({"query": "Query: "}, "query", 6)
    np.testing.assert_allclose(loaded.encode(TEXTS), tiny_encoder.encode(TEXTS), rtol=1e-5, atol=1e-6)
    other = LLM2Comp.from_pretrained(str(tmp_path / "m"), prompts={"q": "Q: "}, truncate_dim=3)
    # as sentence-transformers: the prompts given join the saved ones, whose default stays
    assert (other.prompts, other.default_prompt_name, other.truncate_dim) == (
        {"query": "Query: ", "q": "Q: "}, "query", 3)
    assert LLM2Comp.from_pretrained(str(tmp_path / "m"), default_prompt_name="q",
                                    prompts={"q": "Q: "}).default_prompt_name == "q"


@pytest.mark.parametrize("key, value, message", [
    ("prompts", {"query": 3}, "prompts must be a dict"),
    ("default_prompt_name", "nope", "default_prompt_name 'nope' is not one of the prompts"),
    ("truncate_dim", -1, "truncate_dim must be in"),
])
def test_a_bad_saved_encode_default_names_the_file(tiny_encoder, tmp_path, key, value, message):
    tiny_encoder.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    config[key] = value
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{CONFIG_NAME}: {message}"):
        LLM2Comp.from_pretrained(str(tmp_path / "m"))


def test_from_pretrained_checks_the_encode_defaults(tiny_dirs):
    with pytest.raises(ValueError, match="default_prompt_name 'q'"):
        LLM2Comp.from_pretrained(str(tiny_dirs["llama"]), num_memory_tokens=2, default_prompt_name="q")
