import contextlib
import json
import warnings

import numpy as np
import pytest
import torch

from llm2comp import LLM2Comp
from llm2comp.model import CONFIG_NAME, _cpu_float32_copy
from tests.tiny_models import perturb
from tests.utils import assert_rel_close

TEXTS = ["Bushfires burned across New South Wales.", "Rain.", "The cricket team won the test match in Perth.",
         "Shares fell on the stock market today after the bank raised interest rates.", "Fires near Sydney."]




def test_tokenize_layout(tiny_encoder):
    tok, m = tiny_encoder.tokenizer, tiny_encoder.num_memory_tokens
    texts = ["Rain fell.", "Fires."]
    batch = tiny_encoder.tokenize(texts, instruction="Query: ", max_length=64)
    for b, text in enumerate(texts):
        s, ms, ts = int(batch["seq_lens"][b]), int(batch["memory_start"][b]), int(batch["text_start"][b])
        ids = batch["input_ids"][b].tolist()
        # one tokenization of the running text (no lone space token between instruction and text)
        assert ids[0] == tok.bos_token_id and ids[1:ms] == tok("Query: " + text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[1:ts]) == "Query:" and tok.decode(ids[ts:ms]) == " " + text
        assert ids[ms:s] == tiny_encoder.memory_token_ids and ms == s - m
        assert all(i == tok.pad_token_id for i in ids[s:])
        assert batch["attention_mask"][b].tolist() == [1] * s + [0] * (len(ids) - s)
    long = tiny_encoder.tokenize(["word " * 200], max_length=32)
    assert long["input_ids"].shape == (1, 32) and long["input_ids"][0, -m:].tolist() == tiny_encoder.memory_token_ids
    with pytest.raises(ValueError, match="no room"):
        tiny_encoder.tokenize(["x"], max_length=m)


def test_tokenize_with_an_instruction_per_text(tiny_encoder):
    """A list of instructions, one per text, gives each row what tokenizing it alone with its instruction gives,
    padded to the batch's width; `to` moves every field."""
    texts, instructions = ["Rain fell.", "Fires burned for days.", "Floods."], ["Query: ", None, "Query: "]
    batch = tiny_encoder.tokenize(texts, instructions)
    width = batch.input_ids.shape[1]
    for b, (text, instruction) in enumerate(zip(texts, instructions)):
        alone = tiny_encoder.tokenize([text], instruction)
        n = alone.input_ids.shape[1]
        assert batch.input_ids[b, :n].tolist() == alone.input_ids[0].tolist()
        assert batch.input_ids[b, n:].tolist() == [tiny_encoder.pad_token_id] * (width - n)
        for name in ("seq_lens", "memory_start", "text_start"):
            assert batch[name][b] == alone[name][0], name
    assert batch.to("meta").input_ids.is_meta and sorted(dict(batch.to("meta"))) == sorted(batch.keys())


def test_tokenize_edge_texts(tiny_encoder):
    m, mem = tiny_encoder.num_memory_tokens, tiny_encoder.memory_token_ids
    batch = tiny_encoder.tokenize(["", "see <mem_0> here"], instruction="Query: ")
    ms, ts = batch["memory_start"].tolist(), batch["text_start"].tolist()
    assert ms[0] == ts[0] and batch["seq_lens"][0] == ts[0] + m  # empty text: instruction then memory
    text_ids = batch["input_ids"][1, ts[1]:ms[1]].tolist()
    assert not set(text_ids) & set(mem)  # a memory token's name in a text is plain text
    huge = tiny_encoder.tokenize(["word " * 2000], max_length=100_000)
    assert huge["input_ids"].shape[1] == tiny_encoder.max_positions


def test_no_bos_tokenizer(tiny_dirs):
    """A tokenizer without BOS (Qwen): rows start with the decoder's start token, EOS, as compression training's
    decoder and teacher rows do; with prepend_bos=False, with the text."""
    text_ids = None
    for prepend_bos, start in ((True, 1), (False, 0)):
        enc = LLM2Comp.from_pretrained(str(tiny_dirs["qwen2"]), num_memory_tokens=2, lora_rank=2,
                                       prepend_bos=prepend_bos)
        text_ids = enc.tokenizer("Rain fell.", add_special_tokens=False)["input_ids"]
        batch = enc.tokenize(["Rain fell."])
        assert int(batch["text_start"][0]) == start
        assert batch["input_ids"][0, :start].tolist() == [enc.tokenizer.eos_token_id][:start]
        assert batch["input_ids"][0, start].item() == text_ids[0]


def test_bos_and_memory_init_saved(tiny_dirs, tmp_path):
    """prepend_bos and memory_init are part of a saved model; "random" rows are distinct, "mean" rows equal, and
    a model saved before the options (no keys) reads rows as the tokenizer makes them."""
    for prepend_bos, init in ((False, "mean"), (True, "random")):
        enc = LLM2Comp.from_pretrained(str(tiny_dirs["llama"]), num_memory_tokens=3, lora_rank=2,
                                       prepend_bos=prepend_bos, memory_init=init)
        rows = enc.model.get_input_embeddings().weight[enc.memory_token_ids].detach()
        cos = torch.nn.functional.cosine_similarity(rows[0], rows[1], dim=0)
        assert (cos > 0.9999) == (init == "mean")
        enc.save_pretrained(tmp_path / init)
        back = LLM2Comp.from_pretrained(str(tmp_path / init))
        assert (back.prepend_bos, back.memory_init) == (prepend_bos, init)
        assert back.tokenize(["x y"])["input_ids"].tolist() == enc.tokenize(["x y"])["input_ids"].tolist()
    config = tmp_path / "mean" / "llm2comp_config.json"
    saved = json.loads(config.read_text())
    del saved["prepend_bos"], saved["memory_init"]
    config.write_text(json.dumps(saved))
    old = LLM2Comp.from_pretrained(str(tmp_path / "mean"))
    own = old.tokenizer("x y")["input_ids"]  # what the tokenizer adds itself
    assert old.tokenize(["x y"])["input_ids"][0, :len(own)].tolist() == own
    with pytest.raises(ValueError, match="memory_init"):
        LLM2Comp.from_pretrained(str(tiny_dirs["llama"]), memory_init="zeros")


def test_encode_order_shapes_dtypes(tiny_encoder):
    perturb(tiny_encoder)
    out = tiny_encoder.encode(TEXTS, batch_size=2)
    assert isinstance(out, np.ndarray) and out.shape == (5, 64) and out.dtype == np.float32
    for i, text in enumerate(TEXTS):
        single = tiny_encoder.encode(text)
        assert single.shape == (64,)
        np.testing.assert_allclose(single, out[i], rtol=1e-4, atol=1e-5)  # alone == batched, order restored
    t = tiny_encoder.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    torch.testing.assert_close(t.norm(dim=1), torch.ones(5))
    as_list = tiny_encoder.encode(TEXTS[:2], convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 2 and as_list[0].shape == (64,)
    assert tiny_encoder.encode([]).shape == (0, 64)
    assert not tiny_encoder.training  # loaded in eval mode
    tiny_encoder.train()
    tiny_encoder.encode(TEXTS[:1])
    assert tiny_encoder.training  # encode restores the mode


def test_poolings_differ_and_match_manual(tiny_encoder):
    perturb(tiny_encoder)
    batch = tiny_encoder.tokenize(TEXTS[:2])
    with torch.no_grad():
        hidden = tiny_encoder.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
        outs = {p: tiny_encoder(**batch, pooling=p) for p in ("memory", "mean", "last")}
    for b in range(2):
        s, ms, ts = (int(batch[k][b]) for k in ("seq_lens", "memory_start", "text_start"))
        assert_rel_close(outs["memory"][b], hidden[b, ms:s].mean(0), tol=1e-5)
        assert_rel_close(outs["mean"][b], hidden[b, ts:ms].mean(0), tol=1e-5)
        assert_rel_close(outs["last"][b], hidden[b, ms - 1], tol=1e-5)
    assert (outs["memory"] - outs["mean"]).abs().max() > 1e-3


@pytest.mark.parametrize("bad, exc, match", [
    (["ok", 3], TypeError, "int"), (None, TypeError, "sequence of str"), (b"text", TypeError, "bytes"),
    ([b"text"], TypeError, "decode it"), ({"a": "b"}, TypeError, "sequence of str"),
])
def test_encode_bad_inputs(tiny_encoder, bad, exc, match):
    with pytest.raises(exc, match=match):
        tiny_encoder.encode(bad)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_empty_text_needs_memory_pooling(tiny_encoder, pooling):
    with pytest.raises(ValueError, match=f"sentences\\[1\\] is empty.*'{pooling}' pooling"):
        tiny_encoder.encode(["ok", "  "], pooling=pooling)
    with pytest.raises(ValueError, match="pooling must be one of"):
        tiny_encoder.encode([], pooling="max")


def test_encode_empty_text_and_array_inputs(tiny_encoder):
    perturb(tiny_encoder)
    out = tiny_encoder.encode(["", TEXTS[0]])
    assert np.isfinite(out).all() and np.abs(out[0] - out[1]).max() > 1e-4
    np.testing.assert_array_equal(tiny_encoder.encode(np.array(TEXTS[:2])), tiny_encoder.encode(TEXTS[:2]))
    np.testing.assert_array_equal(tiny_encoder.encode(t for t in TEXTS[:2]), tiny_encoder.encode(TEXTS[:2]))


def test_encode_unknown_kwarg(tiny_encoder):
    with pytest.raises(TypeError, match="valid: prompt_name, prompt, instruction, batch_size"):
        tiny_encoder.encode(["x"], batchsize=4)


def test_only_memory_rows_and_lora_train(tiny_encoder):
    enc = tiny_encoder
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    embed = enc.model.get_input_embeddings()
    vocab = torch.arange(embed.weight.shape[0] if hasattr(embed, "weight") else len(enc.tokenizer))
    before = embed(vocab).detach().clone()
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=1.0)
    batch = enc.tokenize(TEXTS)
    enc(**batch).square().sum().backward()
    opt.step()
    changed = (embed(vocab).detach() - before).abs().amax(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == enc.memory_token_ids


def test_save_load_round_trip(tiny_encoder, tmp_path):
    perturb(tiny_encoder)
    expected = tiny_encoder.encode(TEXTS)
    tiny_encoder.save_pretrained(tmp_path / "enc")
    files = {p.name for p in (tmp_path / "enc").iterdir()}
    assert {CONFIG_NAME, "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    card = (tmp_path / "enc" / "README.md").read_text()  # an embedding model's card, not peft's text-generation one
    assert card.startswith("---\nlibrary_name: llm2comp\npipeline_tag: feature-extraction\n")
    assert "text-generation" not in card and "base_model:" not in card  # a local base model has no hub id
    assert "4 memory tokens" in card and "LoRA adapters (rank 4, alpha" in card
    config = json.loads((tmp_path / "enc" / CONFIG_NAME).read_text())
    assert config["num_memory_tokens"] == 4 and config["memory_token_ids"] == tiny_encoder.memory_token_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # peft's read of a deprecated transformers attribute, hidden
        loaded = LLM2Comp.from_pretrained(str(tmp_path / "enc"))
    np.testing.assert_allclose(loaded.encode(TEXTS), expected, rtol=1e-5, atol=1e-6)
    # The untied LM head's memory rows (outside the adapter) are re-initialised identically.
    torch.testing.assert_close(loaded.lm_head.weight, tiny_encoder.lm_head.weight)


@pytest.mark.parametrize("base, hub_id", [("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                          ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"), ("/models/local", None)])
def test_model_card_names_the_base_models_hub_id(tiny_encoder, base, hub_id):
    tiny_encoder.base_reference = {"name_or_path": base}
    card = tiny_encoder._model_card(merged=True)
    assert (f"\nbase_model: {hub_id}\n" in card) if hub_id else ("base_model:" not in card)
    assert "LoRA merged into the weights" in card


def test_moved_base_model_and_bad_paths(tiny_encoder, tiny_dirs, tmp_path):
    import shutil

    perturb(tiny_encoder)
    expected = tiny_encoder.encode(TEXTS[:2])
    base = shutil.copytree(tiny_dirs["llama"], tmp_path / "base")
    tiny_encoder.base_reference = {"name_or_path": str(base)}
    tiny_encoder.save_pretrained(tmp_path / "enc")
    base.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=r"base model .*/base named in .*llm2comp_config.json.*base_model="):
        LLM2Comp.from_pretrained(str(tmp_path / "enc"))
    loaded = LLM2Comp.from_pretrained(str(tmp_path / "enc"), base_model=str(tmp_path / "moved"))
    np.testing.assert_allclose(loaded.encode(TEXTS[:2]), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM2Comp.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="backend must be one of"):
        LLM2Comp.from_pretrained(str(tiny_dirs["llama"]), backend="trition")


def test_a_name_that_is_neither_a_directory_nor_a_hub_model_is_named(monkeypatch):
    from llm2comp import model as model_module

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(model_module.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="cannot load the model 'no-such-dir': not a local directory, and as a hub "
                                      "model id: We couldn't connect"):
        model_module._load_base("no-such-dir", None, {})


def test_saved_model_from_a_hub_repo(tiny_encoder, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    perturb(tiny_encoder)
    tiny_encoder.save_pretrained(tmp_path / "enc")
    fetched = []

    def hf_hub_download(repo_id, filename, **_):
        if repo_id != "me/llm2comp-enc":
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / "enc" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: fetched.append(repo_id) or
                        str(tmp_path / "enc"))
    loaded = LLM2Comp.from_pretrained("me/llm2comp-enc")
    assert fetched == ["me/llm2comp-enc"]
    np.testing.assert_allclose(loaded.encode(TEXTS[:2]), tiny_encoder.encode(TEXTS[:2]), rtol=1e-5, atol=1e-6)
    with pytest.raises(OSError):  # a repo without llm2comp_config.json is read as a plain decoder (offline here)
        LLM2Comp.from_pretrained("me/plain-decoder", local_files_only=True)
    assert fetched == ["me/llm2comp-enc"]


def test_merge_and_save_equivalent(tiny_encoder, tmp_path):
    perturb(tiny_encoder)
    expected = tiny_encoder.encode(TEXTS)
    tiny_encoder.merge_and_save(tmp_path / "merged")
    loaded = LLM2Comp.from_pretrained(str(tmp_path / "merged"), lora_rank=2)
    np.testing.assert_allclose(loaded.encode(TEXTS), expected, rtol=1e-4, atol=1e-5)
    assert tiny_encoder.encode(TEXTS[:1]).shape == (1, 64)  # the original model is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # untied and tied LM head
def test_merged_copy_is_a_cpu_float32_fold_leaving_the_model(tiny_dirs, kind, dtype):
    encoder = LLM2Comp.from_pretrained(str(tiny_dirs[kind]), num_memory_tokens=4, lora_rank=4, lora_dropout=0.0,
                                       dtype=dtype)
    perturb(encoder)
    before = {name: p.detach().clone() for name, p in encoder.model.named_parameters()}
    merged = encoder.merged_copy(torch.float32)
    assert {t.device.type for t in [*merged.parameters(), *merged.buffers()]} == {"cpu"}
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    copied = _cpu_float32_copy(encoder.model)  # before the merge: every floating tensor float32 on the CPU
    assert {(t.device.type, t.dtype) for t in [*copied.parameters(), *copied.buffers()] if t.is_floating_point()} == {
        ("cpu", torch.float32)}
    storage = {t.data_ptr() for t in [*encoder.model.parameters(), *encoder.model.buffers()]}
    assert not storage & {t.data_ptr() for t in [*merged.parameters(), *merged.buffers()]}
    tied = merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert tied == merged.config.tie_word_embeddings
    for name, p in encoder.model.named_parameters():
        assert torch.equal(p, before[name]), name
    # Folded in float32: each merged weight is the bf16 base weight plus its LoRA delta without a bf16 rounding.
    layer = encoder.model.get_base_model().model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling["default"]
    want = layer.base_layer.weight.float() + delta
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_merged_copy_makes_no_copy_on_the_gpu(tiny_dirs):
    encoder = perturb(LLM2Comp.from_pretrained(str(tiny_dirs["qwen2"]), num_memory_tokens=4, lora_rank=4,
                                               lora_dropout=0.0, device="cuda", dtype=torch.bfloat16))
    # bf16: a float32 cast of even the largest tensor on the GPU (the embedding) would pass size // 4
    size = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    merged = encoder.merged_copy()
    assert torch.cuda.max_memory_allocated() - start < size // 4  # a copy would be `size` (float32: 2 x size)
    assert merged.device.type == "cpu"


def test_hidden_states_from_embeddings_and_causal_decoder(tiny_encoder, tiny_dirs):
    from transformers import AutoModelForCausalLM

    from llm2comp import causal_attention

    perturb(tiny_encoder)
    batch = tiny_encoder.tokenize(TEXTS[:3])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        by_ids = tiny_encoder.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
        embeds = tiny_encoder.model.get_input_embeddings()(batch["input_ids"])
        by_embeds = tiny_encoder.hidden_states(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        with tiny_encoder.model.disable_adapter(), causal_attention(tiny_encoder.model):
            decoder = tiny_encoder.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert_rel_close(by_embeds[mask], by_ids[mask], tol=1e-6)
    assert (decoder[mask] - by_ids[mask]).abs().max() > 1e-3
    # Adapters off + causal = the original decoder on the text positions (they never see the memory tokens).
    original = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    for b in range(3):
        n = int(batch["memory_start"][b])
        with torch.no_grad():
            ref = original.model(input_ids=batch["input_ids"][b:b + 1, :n], use_cache=False).last_hidden_state[0]
        assert_rel_close(decoder[b, :n], ref, tol=1e-5)


def test_encode_warns_of_non_finite_embeddings(tiny_encoder, monkeypatch):
    from llm2comp import encode

    out = torch.tensor([[1.0, float("nan")], [1.0, 2.0], [float("inf"), 0.0]])
    cpu, t4 = [torch.device("cpu")], [torch.device("cpu"), torch.device("cuda", 1)]  # one pool worker on a T4
    with pytest.warns(UserWarning, match=r"^2 of 3 embeddings are not finite \(NaN or inf\)$"):
        encode._warn_non_finite(out, tiny_encoder, True, cpu)
    monkeypatch.setattr(encode, "has_bf16", lambda device: device.type != "cuda")
    with pytest.warns(UserWarning, match=r"float16 autocast, as this GPU has no bf16, .* autocast=False"):
        encode._warn_non_finite(out, tiny_encoder, True, t4)
    with pytest.warns(UserWarning, match=r"the model is float16, .* load it with dtype=torch.float32\)$"):
        encode._warn_non_finite(out, tiny_encoder.half(), True, t4)
    tiny_encoder.float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode._warn_non_finite(out[1:2], tiny_encoder, True, t4)
        assert tiny_encoder.encode(TEXTS, autocast=False).shape == (len(TEXTS), tiny_encoder.hidden_size)
    with pytest.raises(TypeError, match="autocast must be a bool, got str"):
        tiny_encoder.encode(TEXTS, autocast="no")


def test_revisions_address_the_repo_they_were_given_for(tiny_dirs, tmp_path, monkeypatch):
    """A base model's revision is saved with the adapter and loads the same weights again; the revision of a saved
    encoder's repo addresses that repo only, not its base model (nor does sentence-transformers' loader drop it)."""
    import huggingface_hub
    import sentence_transformers.util.file_io as st_file_io
    from huggingface_hub.errors import EntryNotFoundError

    from llm2comp import model as model_module
    from llm2comp.integrations.sentence_transformers import LLM2CompModule

    asked, fetched = [], []
    for auto in (model_module.AutoTokenizer, model_module.AutoModelForCausalLM):
        def load(name, _real=auto.from_pretrained, **kwargs):
            asked.append((name, kwargs.pop("revision", None)))
            return _real(str(tiny_dirs["llama"]) if name == "org/base" else name, **kwargs)
        monkeypatch.setattr(auto, "from_pretrained", load)

    def hf_hub_download(repo_id, filename, **kwargs):
        if repo_id != "me/enc":
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        fetched.append((filename, kwargs.get("revision"), kwargs.get("local_files_only")))
        if not (tmp_path / "enc" / filename).exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(tmp_path / "enc" / filename)

    def snapshot_download(repo_id, **kwargs):
        fetched.append(("snapshot", kwargs.get("revision"), kwargs.get("local_files_only")))
        return str(tmp_path / "enc")

    for module in (huggingface_hub, st_file_io):
        monkeypatch.setattr(module, "hf_hub_download", hf_hub_download, raising=False)
        monkeypatch.setattr(module, "snapshot_download", snapshot_download, raising=False)
    encoder = LLM2Comp.from_pretrained("org/base", revision="abc", num_memory_tokens=2, lora_rank=2)
    assert asked == [("org/base", "abc")] * 2
    encoder.save_pretrained(tmp_path / "enc")
    saved = json.loads((tmp_path / "enc" / "llm2comp_config.json").read_text())
    assert saved["base_model"] == {"name_or_path": "org/base", "revision": "abc"}
    asked.clear()
    LLM2Comp.from_pretrained("me/enc", revision="v2")
    assert fetched == [("llm2comp_config.json", "v2", None), ("snapshot", "v2", None)]
    assert asked == [(str(tmp_path / "enc"), None), ("org/base", "abc"), ("org/base", "abc")]
    fetched.clear()
    LLM2CompModule.load("me/enc", revision="v2", local_files_only=True)  # SentenceTransformer("me/enc", ...)
    assert {(revision, offline) for _, revision, offline in fetched} == {("v2", True)}
    assert [name for name, _, _ in fetched] == ["sentence_bert_config.json", "llm2comp_config.json", "snapshot"]


def test_a_tokenizer_without_pad_or_eos_token_pads_with_id_0(tiny_encoder):
    perturb(tiny_encoder)
    alone = np.stack([tiny_encoder.encode(text) for text in TEXTS[:3]])  # no padding
    tiny_encoder.tokenizer.pad_token = tiny_encoder.tokenizer.eos_token = None
    assert tiny_encoder.tokenizer.pad_token_id is None and tiny_encoder.pad_token_id == 0
    batch = tiny_encoder.tokenize(TEXTS[:3])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    np.testing.assert_allclose(tiny_encoder.encode(TEXTS[:3]), alone, rtol=1e-5, atol=1e-6)


def test_a_save_that_fails_midway_never_leaves_a_mixed_model(tiny_encoder, tmp_path, monkeypatch):
    import os

    from llm2comp import model as model_module

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "log.jsonl").write_text("{}\n")
    tiny_encoder.save_pretrained(out)
    before = tiny_encoder.encode(TEXTS)
    perturb(tiny_encoder)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:  # while writing: the previous model stays whole
        patch.setattr(tiny_encoder.tokenizer, "save_pretrained", disk_full)
        with pytest.raises(OSError, match="No space left"):
            tiny_encoder.save_pretrained(out)
    np.testing.assert_allclose(LLM2Comp.from_pretrained(str(out)).encode(TEXTS), before, rtol=1e-5, atol=1e-6)
    moved = []

    def replace(src, dst):
        if moved:
            raise OSError(28, "No space left on device")
        moved.append(dst)
        os.replace(src, dst)

    with monkeypatch.context() as patch:  # while moving the files in: no llm2comp config, so nothing loads
        patch.setattr(model_module.os, "replace", replace)
        with pytest.raises(OSError, match="No space left"):
            tiny_encoder.save_pretrained(out)
    assert not (out / CONFIG_NAME).exists()
    tiny_encoder.save_pretrained(out)
    np.testing.assert_allclose(LLM2Comp.from_pretrained(str(out)).encode(TEXTS), tiny_encoder.encode(TEXTS),
                               rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in out.iterdir() if not p.is_file() or p.name == "log.jsonl") == [
        "checkpoints", "log.jsonl"]  # the run's other files stay; no temporary folder is left


def test_similarity_is_the_cosine_matrix(tiny_encoder):
    perturb(tiny_encoder)
    a, b = tiny_encoder.encode(TEXTS[:3]), tiny_encoder.encode(TEXTS[1:], convert_to_tensor=True)
    sims = tiny_encoder.similarity(a, b)
    assert isinstance(sims, torch.Tensor) and sims.dtype == torch.float32 and sims.shape == (3, len(TEXTS) - 1)
    a64, b64 = a.astype(np.float64), b.double().numpy()
    want = (a64 @ b64.T) / np.linalg.norm(a64, axis=1)[:, None] / np.linalg.norm(b64, axis=1)[None, :]
    np.testing.assert_allclose(sims.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(LLM2Comp.similarity(a[0], b).numpy(), want[:1], rtol=1e-5, atol=1e-6)  # [D]: one row
    with pytest.raises(ValueError, match="different sizes: 64 and 3"):
        tiny_encoder.similarity(a, np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"b must be float embeddings \[n, D\] or \[D\], got torch.int64"):
        tiny_encoder.similarity(a, torch.ones(2, 64, dtype=torch.long))


def test_merge_lora_and_restart_keeps_the_function_and_saves_it(tiny_encoder, tmp_path):
    """Folding the LoRA into the weights and restarting it changes no embedding; a model trained again after
    that saves and reloads to the same embeddings (base + folded LoRA of every earlier stage + current one)."""
    perturb(tiny_encoder, seed=1)
    before = tiny_encoder.encode(TEXTS, convert_to_tensor=True)
    tiny_encoder.merge_lora_and_restart()
    assert all(not p.any() for n, p in tiny_encoder.named_parameters() if "lora_B" in n)  # restarted
    assert_rel_close(tiny_encoder.encode(TEXTS, convert_to_tensor=True), before, tol=1e-5)
    rank = tiny_encoder.model.peft_config["default"].r
    for seed in (2, 3):  # two more stages
        perturb(tiny_encoder, seed=seed)
        tiny_encoder.merge_lora_and_restart()
    perturb(tiny_encoder, seed=4)
    a, b = next(iter(tiny_encoder.merged_lora.values()))
    assert a.shape[0] == b.shape[1] == 3 * rank  # the folded factors of three stages, concatenated
    trained = tiny_encoder.encode(TEXTS, convert_to_tensor=True)
    tiny_encoder.save_pretrained(tmp_path)
    back = LLM2Comp.from_pretrained(str(tmp_path))
    assert_rel_close(back.encode(TEXTS, convert_to_tensor=True), trained, tol=1e-5)
    back.merge_and_save(tmp_path / "merged")
    assert_rel_close(LLM2Comp.from_pretrained(str(tmp_path / "merged")).encode(TEXTS, convert_to_tensor=True),
                     trained, tol=1e-4)


def test_merge_lora_and_restart_of_an_untrained_adapter_folds_nothing(tiny_encoder):
    tiny_encoder.merge_lora_and_restart()
    assert tiny_encoder.merged_lora == {}


def _evil_encoder(encoder, base_dir, tmp_path, **base_extra):
    """An encoder saved with `base_extra` in its config's base_model, on a copy of `base_dir` whose config.json maps
    AutoConfig to its own evil.py; importing evil.py writes the file it returns (the marker)."""
    import shutil

    base, marker = shutil.copytree(base_dir, tmp_path / "evil_base"), tmp_path / "evil_ran"
    (base / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                  "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    pass\n")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    encoder.base_reference = {"name_or_path": str(base), **base_extra}
    encoder.save_pretrained(tmp_path / "enc")
    return tmp_path / "enc", marker


@pytest.mark.parametrize("key, value", [("trust_remote_code", True), ("bogus_kw", 1)])
def test_a_saved_config_cannot_pass_other_loading_arguments(tiny_encoder, tiny_dirs, tmp_path, monkeypatch, capsys,
                                                            key, value):
    """Only the keys that name the base model's weights are read from llm2comp_config.json: a downloaded encoder
    never turns on trust_remote_code (which would run its base model's code) nor anything else."""
    import huggingface_hub

    from llm2comp import cli

    enc, marker = _evil_encoder(tiny_encoder, tiny_dirs["llama"], tmp_path, **{key: value})
    message = rf"{enc / CONFIG_NAME}: base_model.{key} is not a key llm2comp reads \(only name_or_path, "
    with pytest.raises(ValueError, match=message):
        LLM2Comp.from_pretrained(str(enc))
    assert cli.main(["encode", "--model", str(enc), "--device", "cpu", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"base_model.{key} is not a key llm2comp reads" in err
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **_: str(enc / filename))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: str(enc))
    with pytest.raises(ValueError, match=message):  # the same from a hub repo
        LLM2Comp.from_pretrained("someone/llm2comp-enc")
    assert not marker.exists()


def test_remote_code_runs_only_when_the_caller_trusts_it(tiny_encoder, tiny_dirs, tmp_path):
    enc, marker = _evil_encoder(tiny_encoder, tiny_dirs["llama"], tmp_path)
    LLM2Comp.from_pretrained(str(enc))  # a Llama config: transformers reads it without the auto_map
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the evil config need not load: it ran
        LLM2Comp.from_pretrained(str(enc), trust_remote_code=True)
    assert marker.exists()


def _edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in changes or changes[k] is not None}
    path.write_text(json.dumps({**config, **{k: v for k, v in changes.items() if v is not None}}))


@pytest.mark.parametrize("damage, error, message", [
    (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError,
     "{d}/adapter_model.safetensors is missing"),
    (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError, "{d}/adapter_config.json is missing"),
    (lambda d: (d / CONFIG_NAME).write_text((d / CONFIG_NAME).read_text()[:40]), ValueError,
     "{d}/llm2comp_config.json: not valid JSON"),
    (lambda d: _edit_config(d, merged=None), ValueError, "{d}/llm2comp_config.json: 'merged' is missing"),
    (lambda d: _edit_config(d, pooling=3), ValueError, "{d}/llm2comp_config.json: 'pooling' is not a str"),
    (lambda d: _edit_config(d, memory_token_ids=[512, 513, 514]), ValueError,
     "{d}/llm2comp_config.json: memory_token_ids [512, 513, 514] are not num_memory_tokens (4) token ids"),
    (lambda d: _edit_config(d, memory_token_ids=[512, 513, 514], num_memory_tokens=3), ValueError,
     "{d}/llm2comp_config.json: memory_token_ids [512, 513, 514] are not the memory rows the adapter trained "
     "([512, 513, 514, 515]"),
    (lambda d: _edit_config(d, memory_token_ids=[512, 513, 514, 9999]), ValueError,
     "{d}/llm2comp_config.json: memory_token_ids [512, 513, 514, 9999] are outside the tokenizer's vocabulary "
     "(516 tokens)"),
    (lambda d: _edit_config(d, version=99), ValueError,
     "{d}/llm2comp_config.json: format 'llm2comp' version 99; this llm2comp reads format 'llm2comp' version 1"),
    (lambda d: _edit_config(d, format="other"), ValueError, "{d}/llm2comp_config.json: format 'other' version 1"),
    (lambda d: [p.unlink() for p in d.iterdir()], FileNotFoundError,
     "{d} holds no model: neither llm2comp_config.json (an LLM2Comp model) nor config.json"),
    (lambda d: _edit_config(d, memory_init="zeros"), ValueError,
     "{d}/llm2comp_config.json: memory_init 'zeros' is not one of"),
    (lambda d: _edit_config(d, prepend_bos="yes"), ValueError, "{d}/llm2comp_config.json: 'prepend_bos' is not a bool"),
    (lambda d: _edit_config(d, merged_lora=True), FileNotFoundError, "{d}/merged_lora.safetensors is missing"),
], ids=["no adapter weights", "no adapter config", "truncated config", "missing key", "bad type", "ids cut",
        "ids and count cut", "ids outside the vocabulary", "version 99", "other format", "empty directory",
        "unknown memory init", "bos not a bool", "folded LoRA missing"])
def test_a_damaged_saved_model_is_one_clear_error(damage, error, message, tiny_encoder, tmp_path):
    enc = tmp_path / "enc"
    tiny_encoder.save_pretrained(enc)
    assert tiny_encoder.memory_token_ids == [512, 513, 514, 515]
    damage(enc)
    with pytest.raises(error) as info:
        LLM2Comp.from_pretrained(str(enc))
    assert str(info.value).startswith(message.format(d=enc))


def test_memory_ids_outside_a_merged_models_vocabulary_are_refused(tiny_encoder, tmp_path, capsys):
    from llm2comp import cli

    tiny_encoder.merge_and_save(tmp_path / "merged")
    _edit_config(tmp_path / "merged", memory_token_ids=[512, 513, 514, 600])
    assert cli.main(["encode", "--model", str(tmp_path / "merged"), "--device", "cpu", "x"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"llm2comp encode: error: {tmp_path / 'merged' / CONFIG_NAME}: memory_token_ids [512, 513, 514, 600] are "
        "outside the tokenizer's vocabulary (516 tokens)")  # after transformers' progress bars


def test_repr_is_one_line_of_what_the_encoder_is(tiny_encoder, tiny_dirs):
    text = repr(tiny_encoder)
    assert text == (f"LLM2Comp(base={str(tiny_dirs['llama'])!r}, pooling='memory', num_memory_tokens=4, "
                    f"hidden_size=64, lora_rank=4, dtype=float32, device=cpu)")
    tiny_encoder.prompts, tiny_encoder.default_prompt_name, tiny_encoder.truncate_dim = {"query": "Q: "}, "query", 32
    assert repr(tiny_encoder).endswith("device=cpu, prompts=['query'], default_prompt_name='query', truncate_dim=32)")
