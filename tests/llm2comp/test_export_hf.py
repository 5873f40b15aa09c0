"""`llm2comp export --format hf`: a transformers directory that reproduces `LLM2Comp.encode` without llm2comp."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llm2comp import LLM2Comp
from llm2comp.cli import main
from llm2comp.export.hf import export_hf
from tests.tiny_models import as_trained

TEXTS = ["The cricket team won the test match in Perth after a long day in the sun. " * 3,
         "Shares fell on the stock market today.", "Fires near Sydney.", "a"]

# Run in a fresh interpreter that never imports llm2comp: the model card's own code (its placeholders filled in),
# then the same model with the 4D key-padding mask instead of config.is_causal, pooled by the card's function.
PLAIN = r'''
import json, sys
import torch
directory, texts = sys.argv[1], json.loads(sys.argv[2])
card = open(f"{directory}/README.md").read()
code = card.split("```python")[1].split("```")[0]
code = code.replace('"path/or/repo-id"', repr(directory)).replace('["first text", "second text"]', repr(texts))
scope = {}
exec(code, scope)
model, batch, pool = scope["model"], scope["batch"], scope[sys.argv[3]]
mask = batch["attention_mask"]
model.config.is_causal = True  # only the 4D mask keeps the attention bidirectional now
with torch.no_grad():
    hidden = model(input_ids=batch["input_ids"],
                   attention_mask=mask[:, None, None, :].bool().expand(-1, 1, mask.shape[1], -1)).last_hidden_state
    causal = model(**batch).last_hidden_state
extra = (scope["num_bos"],) if sys.argv[3] == "mean_pooling" else ()
four_d = pool(hidden, mask, scope["M"], *extra)
assert not any(name.startswith("llm2comp") for name in sys.modules), "llm2comp was imported"
print(json.dumps({"card": scope["embeddings"].tolist(), "four_d": four_d.tolist(),
                  "input_ids": batch["input_ids"].tolist(),
                  "causal_differs": bool((causal - hidden).abs().max() > 1e-3)}))
'''


def _run_plain(directory, pooling_function: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PLAIN, str(directory), json.dumps(TEXTS), pooling_function],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind, pooling", [("llama", "memory"), ("qwen3", "memory"), ("gemma", "memory"),
                                           ("mistral", "mean"), ("qwen2", "last")])
def test_plain_transformers_reproduce_encode(tiny_dirs, tmp_path, kind, pooling):
    model = as_trained(LLM2Comp.from_pretrained(str(tiny_dirs[kind]), num_memory_tokens=4, lora_rank=4,
                                                lora_dropout=0.0, pooling=pooling))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_hf(model, tmp_path / "hf")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export changed the model"
    got = _run_plain(tmp_path / "hf", f"{pooling}_pooling")
    want = model.encode(TEXTS, autocast=False)
    np.testing.assert_allclose(np.array(got["four_d"]), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(got["card"]), model.encode(TEXTS, normalize_embeddings=True), rtol=0,
                               atol=1e-5)
    rows = model.tokenize(TEXTS)
    assert got["input_ids"] == rows.input_ids.tolist()
    assert got["causal_differs"]  # the check can tell bidirectional from causal attention


# sentence-transformers on the export, in a fresh interpreter that never imports llm2comp and trusts no remote code
SENTENCE_TRANSFORMERS = r'''
import json, sys
import torch
from sentence_transformers import SentenceTransformer
directory, texts = sys.argv[1], json.loads(sys.argv[2])
st = SentenceTransformer(directory, device="cpu", trust_remote_code=False)
out = {"plain": st.encode(texts).tolist(), "modules": [type(m).__name__ for m in st]}
if st.prompts.get("query"):
    out["query"] = st.encode_query(texts).tolist()
    out["document"] = st.encode_document(texts, normalize_embeddings=True).tolist()
st.max_seq_length = 12  # tokens per row, BOS and memory tokens included, as encode's max_length
out["short"] = st.encode(texts).tolist()
assert not any(name.startswith("llm2comp") for name in sys.modules), "llm2comp was imported"
print(json.dumps(out))
'''


@pytest.mark.parametrize("kind, pooling", [("llama", "memory"), ("qwen3", "memory"), ("mistral", "mean")])
def test_sentence_transformers_load_the_export_without_remote_code(tiny_dirs, tmp_path, kind, pooling):
    pytest.importorskip("sentence_transformers")
    model = as_trained(LLM2Comp.from_pretrained(str(tiny_dirs[kind]), num_memory_tokens=4, lora_rank=4,
                                                lora_dropout=0.0, pooling=pooling))
    if pooling == "memory":  # a prompt is read by the memory tokens; mean pooling here counts its tokens
        model.prompts, model.truncate_dim = {"query": "Query: ", "document": "Passage: "}, 24
    export_hf(model, tmp_path / "hf")
    done = subprocess.run([sys.executable, "-c", SENTENCE_TRANSFORMERS, str(tmp_path / "hf"), json.dumps(TEXTS)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["modules"] == ["Transformer", "WordWeights", "Pooling"]
    np.testing.assert_allclose(np.array(got["plain"]), model.encode(TEXTS, autocast=False), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(got["short"]), model.encode(TEXTS, max_length=12), rtol=0, atol=1e-5)
    if pooling == "memory":
        assert np.array(got["plain"]).shape[1] == 24
        np.testing.assert_allclose(np.array(got["query"]), model.encode_query(TEXTS), rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.array(got["document"]),
                                   model.encode_document(TEXTS, normalize_embeddings=True), rtol=0, atol=1e-5)
        assert not np.allclose(got["query"], got["plain"], atol=1e-3)  # the prompt reached the encoder


def test_last_pooling_exports_no_sentence_transformers_modules(tiny_dirs, tmp_path):
    model = LLM2Comp.from_pretrained(str(tiny_dirs["qwen2"]), num_memory_tokens=4, lora_rank=4, pooling="last")
    export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf" / "modules.json").exists()
    assert "no sentence-transformers modules" in (tmp_path / "hf" / "README.md").read_text()


def test_token_weights_refuse_a_vocab_that_word_weights_would_misread(_tiny_encoder):
    from llm2comp.export.hf import _token_weights

    class Tokenizer:  # the memory token's upper-case twin would get its weight through the lower-case fallback
        tokens = ["a", "<mem_0>", "<MEM_0>"]

        def __len__(self):
            return 3

        def convert_ids_to_tokens(self, ids):
            return [self.tokens[i] for i in ids]

    model = copy.copy(_tiny_encoder)
    model.memory_token_ids, model.bos_ids, model.pooling = [1], [], "memory"
    with pytest.raises(ValueError, match="'<MEM_0>' \\(id 2\\) would be weighed 1.0"):
        _token_weights(model, Tokenizer())
    model.pooling = "mean"  # mean pooling leaves the memory tokens out: the twin would be left out too
    with pytest.raises(ValueError, match="'<MEM_0>' \\(id 2\\) would be weighed 0.0"):
        _token_weights(model, Tokenizer())
    Tokenizer.tokens[2] = "b"
    assert _token_weights(model, Tokenizer()) == (["a", "<mem_0>", "b"], {"<mem_0>": 0.0}, 1.0, [1.0, 0.0, 1.0])
    model.pooling = "memory"
    assert _token_weights(model, Tokenizer()) == (["a", "<mem_0>", "b"], {"<mem_0>": 1.0}, 0.0, [0.0, 1.0, 0.0])


def test_an_export_that_sentence_transformers_misread_is_refused(_tiny_encoder, tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    from llm2comp.export import hf

    right = hf._token_weights
    monkeypatch.setattr(hf, "_token_weights",  # every token weighed 1: plain mean pooling
                        lambda model, tokenizer: (right(model, tokenizer)[0], {}, 1.0, [1.0] * len(tokenizer)))
    with pytest.raises(RuntimeError, match="sentence-transformers on .* does not reproduce"):
        export_hf(copy.deepcopy(_tiny_encoder), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_tokenizer_truncates_like_the_encoder(_tiny_encoder, tmp_path):
    from transformers import AutoTokenizer

    export_hf(_tiny_encoder, tmp_path / "hf", check=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for max_length in (7, 12, 40):
        batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        rows = _tiny_encoder.tokenize(TEXTS, max_length=max_length)
        assert torch.equal(batch["input_ids"], rows.input_ids) and torch.equal(batch["attention_mask"],
                                                                                rows.attention_mask), max_length


def test_a_family_that_ignores_is_causal_is_refused_and_leaves_nothing(_tiny_encoder, tmp_path, monkeypatch):
    from transformers import masking_utils

    # as a transformers without the switch: no bidirectional mask, so sdpa falls back to its causal default
    monkeypatch.setattr(masking_utils, "create_bidirectional_mask", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="does not reproduce the encoder"):
        export_hf(copy.deepcopy(_tiny_encoder), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_failed_export_leaves_nothing_behind(_tiny_encoder, tmp_path, monkeypatch):
    model = copy.deepcopy(_tiny_encoder)
    monkeypatch.setattr(type(model.tokenizer), "is_fast", property(lambda self: False))
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    (tmp_path / "empty").mkdir()
    monkeypatch.undo()
    monkeypatch.setattr(type(model), "merged_copy", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, tmp_path / "empty")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_export_refuses_a_directory_in_use(_tiny_encoder, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_hf(_tiny_encoder, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_export_command(_tiny_encoder, tmp_path, capsys):
    model = as_trained(copy.deepcopy(_tiny_encoder))
    model.prompts, model.default_prompt_name = {"query": "Query: "}, "query"
    model.save_pretrained(tmp_path / "trained")
    assert main(["export", str(tmp_path / "trained"), str(tmp_path / "hf")]) == 0
    assert "wrote a transformers model" in capsys.readouterr().out
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "memory_pooling" in card and "'Query: '" in card
    saved = json.loads((tmp_path / "hf" / "llm2comp_export.json").read_text())
    assert saved["prompts"] == {"query": "Query: "} and saved["num_memory_tokens"] == 4
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["is_causal"] is False
    assert main(["export", str(tmp_path / "trained"), str(tmp_path / "hf")]) != 0  # not empty any more
