import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm2comp import causal_attention, is_patched, patch_bidirectional, unpatch_bidirectional
from llm2comp_kernels._backends import why_not
from tests.tiny_models import CONFIGS, tiny_config, train_tokenizer
from tests.utils import assert_rel_close

TEXTS = ["The fire spread quickly through the dry bush near Sydney.", "Rain fell."]


def _load(path):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return tok, model


def _hidden(model, batch):
    with torch.no_grad():
        return model.model(**batch, use_cache=False).last_hidden_state


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bidirectional_then_unpatched(kind, tiny_dirs):
    tok, model = _load(tiny_dirs[kind])
    a = tok(TEXTS[:1], return_tensors="pt")
    b = {k: v.clone() for k, v in a.items()}
    b["input_ids"][0, -1] = (b["input_ids"][0, -1] + 7) % len(tok)  # change only the last token
    causal_a = _hidden(model, a)
    patch_bidirectional(model)
    assert is_patched(model)
    assert not any(m.is_causal for m in model.modules() if hasattr(m, "q_proj"))
    ha, hb = _hidden(model, a), _hidden(model, b)
    assert (ha[0, 0] - hb[0, 0]).abs().max() > 1e-3, "a later token must change the first position"
    unpatch_bidirectional(model)
    assert not is_patched(model)
    assert all(m.is_causal for m in model.modules() if hasattr(m, "q_proj"))
    ua, ub = _hidden(model, a), _hidden(model, b)
    torch.testing.assert_close(ua[0, :-1], ub[0, :-1])
    torch.testing.assert_close(ua, causal_a)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma"])
def test_causal_switch_equals_original(kind, tiny_dirs):
    tok, model = _load(tiny_dirs[kind])
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    original = _hidden(model, batch)
    patch_bidirectional(model)
    with causal_attention(model):
        causal = _hidden(model, batch)
    assert not any(m.is_causal for m in model.modules() if hasattr(m, "q_proj"))
    assert_rel_close(causal[mask], original[mask], tol=1e-5)
    assert (_hidden(model, batch)[mask] - original[mask]).abs().max() > 1e-3


def test_padding_invariance(tiny_dirs):
    tok, model = _load(tiny_dirs["mistral"])
    patch_bidirectional(model)
    alone = _hidden(model, tok(TEXTS[1:], return_tensors="pt"))
    batch = tok(["A much longer text that pads the short one a lot.", TEXTS[1], TEXTS[0]], padding=True,
                return_tensors="pt")
    together = _hidden(model, batch)
    n = alone.shape[1]
    assert_rel_close(together[1, :n], alone[0], tol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_float32_model_under_bf16_autocast(kind, tiny_dirs):
    # What training with --precision bf16 and encode on a GPU run: the rotary embedding leaves q and k in fp32
    # beside a bf16 v, and memory_attention takes all three in the autocast dtype, as SDPA does.
    tok, model = _load(tiny_dirs[kind])
    patch_bidirectional(model)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    full = _hidden(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _hidden(model, batch)
    assert_rel_close(mixed[mask].float(), full[mask], tol=0.05)


def test_left_padding_rejected(tiny_dirs):
    tok, model = _load(tiny_dirs["llama"])
    patch_bidirectional(model)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right padding"):
        _hidden(model, batch)


def test_unsupported_model_type_and_double_unpatch(tiny_dirs):
    _, model = _load(tiny_dirs["llama"])
    with pytest.raises(ValueError, match="not patched"):
        unpatch_bidirectional(model)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="supports model types"):
        patch_bidirectional(model)


def test_packed_sequences_refused(tiny_dirs):
    """position_ids that restart within a row (DataCollatorWithFlattening) ask for a per-document mask that
    the attention does not apply: refused, not silently attended across documents."""
    _, model = _load(tiny_dirs["llama"])
    patch_bidirectional(model)
    ids = torch.randint(5, 100, (1, 6))
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=False)
    model(input_ids=ids, position_ids=torch.arange(6)[None], use_cache=False)  # one sequence per row: fine


def test_loaded_with_the_attention_name_is_not_patched(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="llm2comp")
    assert not is_patched(model)  # the layers are still causal
    patch_bidirectional(model)
    assert is_patched(model)
    unpatch_bidirectional(model)
    assert not is_patched(model)


@pytest.mark.skipif(why_not("triton", torch.device("cpu"), torch.float32, None) is not None
                    and not torch.cuda.is_available(), reason="triton backend unavailable")
def test_torch_and_triton_backends_agree(tiny_dirs):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok, model = _load(tiny_dirs["qwen3"])
    model.to(device)
    batch = tok(TEXTS, padding=True, return_tensors="pt").to(device)
    mask = batch["attention_mask"].bool()
    patch_bidirectional(model, backend="torch")
    ref = _hidden(model, batch)
    patch_bidirectional(model, backend="triton")
    out = _hidden(model, batch)
    assert_rel_close(out[mask], ref[mask], tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 64])
def test_gpu_auto_backend_matches_torch_bf16(head_dim):
    """On GPU, "auto" (cuda kernel for d=64 bf16, Triton otherwise) agrees with the torch oracle."""
    tok = train_tokenizer(add_bos=True)
    torch.manual_seed(0)
    config = tiny_config("llama", tok, hidden_size=4 * head_dim, head_dim=head_dim)
    model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt").to("cuda")
    mask = batch["attention_mask"].bool()
    patch_bidirectional(model, backend="torch")
    ref = _hidden(model, batch)
    patch_bidirectional(model, backend="auto")
    out = _hidden(model, batch)
    assert_rel_close(out[mask].float(), ref[mask].float(), tol=2e-2)


@pytest.mark.parametrize("kwargs, match", [
    ({"sliding_window": 4}, "no sliding window: sequence length 5 exceeds the model's sliding_window=4"),
    ({"softcap": 50.0}, r"no logit soft-capping \(got softcap=50.0\)"),
])
def test_attention_options_it_cannot_honour_are_refused(kwargs, match):
    """What a layer asks of the attention function and memory_attention does not do is an error, not ignored."""
    from llm2comp.bidirectional import _llm2comp_attention

    q = torch.randn(1, 2, 5, 8)
    module = torch.nn.Module()
    module.is_causal = False
    with pytest.raises(ValueError, match=match):
        _llm2comp_attention(module, q, q, q, None, **kwargs)
    out, _ = _llm2comp_attention(module, q, q, q, None, sliding_window=5)  # a window the sequence fits in
    assert out.shape == (1, 5, 2, 8)


def test_attention_dropout_acts_in_training_only():
    """set_attention_dropout reaches every layer: a train-mode forward draws masks (two calls differ, and equal
    ones under the same seed), an eval-mode forward is deterministic and equal to the model without dropout."""
    from llm2comp.bidirectional import set_attention_dropout

    tok = train_tokenizer(add_bos=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tok))
    patch_bidirectional(model, backend="torch")
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    plain = _hidden(model.eval(), batch)
    set_attention_dropout(model, 0.3)
    assert model.config.attention_dropout == 0.3
    torch.testing.assert_close(_hidden(model.eval(), batch), plain)
    model.train()
    torch.manual_seed(1)
    first = _hidden(model, batch)
    torch.manual_seed(1)
    torch.testing.assert_close(_hidden(model, batch), first)
    assert not torch.allclose(_hidden(model, batch)[mask], first[mask])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        set_attention_dropout(model, 1.0)
