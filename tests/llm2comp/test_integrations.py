import json

import numpy as np
import pytest
import torch

from llm2comp.integrations.mteb import MTEBEncoder, e5_instruction
from llm2comp.integrations.sentence_transformers import sentence_transformer

TEXTS = ["Bushfires burned across New South Wales.", "Rain.", "The cricket team won the test match in Perth."]


def test_sentence_transformer_matches_encode(tiny_encoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    st = sentence_transformer(tiny_encoder)
    assert st.get_embedding_dimension() == 64
    np.testing.assert_allclose(st.encode(TEXTS), tiny_encoder.encode(TEXTS), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.encode(TEXTS, prompt="Query: "), tiny_encoder.encode(TEXTS, instruction="Query: "),
                               rtol=1e-5, atol=1e-6)
    # A plain LLM2Comp directory loads as a SentenceTransformer (custom module: trust_remote_code).
    tiny_encoder.save_pretrained(tmp_path / "enc")
    loaded = SentenceTransformer(str(tmp_path / "enc"), trust_remote_code=True)
    np.testing.assert_allclose(loaded.encode(TEXTS), tiny_encoder.encode(TEXTS), rtol=1e-5, atol=1e-6)
    loaded.max_seq_length = 9
    loaded.save(str(tmp_path / "st"))
    again = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True)
    assert again.max_seq_length == 9  # kept across save and load
    np.testing.assert_allclose(again.encode(TEXTS), tiny_encoder.encode(TEXTS, max_length=9), rtol=1e-5, atol=1e-6)
    bf16 = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, model_kwargs={"torch_dtype": "bfloat16"})
    assert next(bf16[0].encoder.parameters()).dtype == torch.bfloat16


def test_sentence_transformers_gets_the_saved_prompts_and_truncate_dim(tiny_encoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    tiny_encoder.prompts, tiny_encoder.default_prompt_name = {"query": "Query: "}, "query"
    tiny_encoder.truncate_dim = 8
    tiny_encoder.save_pretrained(tmp_path / "enc")
    for st in (SentenceTransformer(str(tmp_path / "enc"), trust_remote_code=True), sentence_transformer(tiny_encoder)):
        for ours, theirs in ((tiny_encoder.encode, st.encode), (tiny_encoder.encode_query, st.encode_query),
                             (tiny_encoder.encode_document, st.encode_document)):
            got, want = theirs(TEXTS), ours(TEXTS)
            assert got.shape == want.shape == (3, 8)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_directories_naming_the_old_module_path_still_load(tiny_encoder, tmp_path):
    """New saves name `llm2comp.integrations.sentence_transformers.LLM2CompModule` in modules.json; directories
    naming ``llm2comp.interop.LLM2CompModule`` load as before."""
    from sentence_transformers import SentenceTransformer

    tiny_encoder.save_pretrained(tmp_path / "enc")
    modules = json.loads((tmp_path / "enc" / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["llm2comp.integrations.sentence_transformers.LLM2CompModule"]
    modules[0]["type"] = "llm2comp.interop.LLM2CompModule"
    (tmp_path / "enc" / "modules.json").write_text(json.dumps(modules))
    loaded = SentenceTransformer(str(tmp_path / "enc"), trust_remote_code=True)
    np.testing.assert_allclose(loaded.encode(TEXTS), tiny_encoder.encode(TEXTS), rtol=1e-5, atol=1e-6)


def test_sentence_transformers_multi_process_encoding_runs_the_module(tiny_encoder):
    """sentence-transformers' own multi-process encoding (a device list) pickles the LLM2Comp module to its
    workers: the embeddings of one process."""
    st = sentence_transformer(tiny_encoder)
    np.testing.assert_allclose(st.encode(TEXTS * 3, device=["cpu", "cpu"]), st.encode(TEXTS * 3), rtol=1e-5,
                               atol=1e-6)


class _Meta:
    name, description = "Toy", "Retrieve news about fires"


def test_mteb_instructions(tiny_encoder):
    enc = MTEBEncoder("tiny", model=tiny_encoder, instructions={"Toy": "Find fire reports"}, batch_size=2)
    assert enc.instruction(_Meta, "query") == "Instruct: Find fire reports\nQuery: "
    assert enc.instruction(_Meta, "document") == ""
    assert enc.instruction(_Meta, None) == e5_instruction("Find fire reports")
    batches = [{"text": TEXTS[:2]}, {"text": TEXTS[2:]}]
    out = enc.encode(batches, task_metadata=_Meta, hf_split="test", hf_subset="default", prompt_type=None)
    np.testing.assert_allclose(out, tiny_encoder.encode(TEXTS, instruction=e5_instruction("Find fire reports")),
                               rtol=1e-5, atol=1e-6)
    tiny_encoder.prompts, tiny_encoder.default_prompt_name = {"query": "Query: "}, "query"
    docs = enc.encode(batches, task_metadata=_Meta, hf_split="test", hf_subset="default", prompt_type="document")
    np.testing.assert_allclose(docs, tiny_encoder.encode(TEXTS, prompt=""), rtol=1e-5, atol=1e-6)  # no prompt
    tiny_encoder.prompts, tiny_encoder.default_prompt_name = {}, None
    sim = enc.similarity(out, out)
    assert sim.shape == (3, 3)
    np.testing.assert_allclose(np.diag(sim.numpy()), 1.0, rtol=1e-5)
    np.testing.assert_allclose(enc.similarity_pairwise(out, docs).numpy(), np.diag(enc.similarity(out, docs).numpy()),
                               rtol=1e-5)


def test_mteb_encoder_on_several_devices(tiny_encoder):
    batches = [{"text": TEXTS[:2]}, {"text": TEXTS[2:]}]
    with MTEBEncoder("tiny", model=tiny_encoder, device=["cpu", "cpu"]) as enc:
        out = enc.encode(batches, task_metadata=_Meta, hf_split="test", hf_subset="default", prompt_type="query")
    assert enc.pool.closed
    np.testing.assert_allclose(out, tiny_encoder.encode(TEXTS, instruction=enc.instruction(_Meta, "query")),
                               rtol=1e-5, atol=1e-6)


def test_mteb_protocol_runs_mock_tasks(tiny_encoder):
    mteb = pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from mteb.mocks.mock_tasks.sts import MockSTSTask
    from mteb.models.models_protocols import EncoderProtocol

    enc = MTEBEncoder("tiny", model=tiny_encoder)
    assert isinstance(enc, EncoderProtocol)
    result = mteb.evaluate(enc, [MockSTSTask(), MockRetrievalTask()], cache=None, show_progress_bar=False)
    assert [r.task_name for r in result.task_results] == ["MockSTSTask", "MockRetrievalTask"]
    assert all(np.isfinite(r.get_score()) for r in result.task_results)


def test_mteb_encoder_loads_the_revision_it_records(tiny_encoder, monkeypatch):
    from llm2comp import LLM2Comp

    asked = []
    monkeypatch.setattr(LLM2Comp, "from_pretrained",
                        lambda name, **kwargs: asked.append((name, kwargs)) or tiny_encoder)
    enc = MTEBEncoder("me/enc", "v2", device="cpu")
    assert asked == [("me/enc", {"device": "cpu", "revision": "v2"})] and enc.revision == "v2"
