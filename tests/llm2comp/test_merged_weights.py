"""`llm2comp.merged_weights`: encode on the CPU runs the LoRA and memory-row layers on cached merged weights, and
gives what peft's unmerged layers give, without changing the model."""

import copy

import numpy as np
import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

from llm2comp import merged_weights
from tests.tiny_models import perturb

TEXTS = ["Bushfires burned across New South Wales.", "Rain.", "The cricket team won the test match in Perth.",
         "Shares fell on the stock market today after the bank raised interest rates.", "Fires near Sydney."]




@pytest.fixture
def trained(tiny_encoder):
    """A LoRA trained and folded into the base (as between stages), a second one trained on top."""
    perturb(tiny_encoder, 1).merge_lora_and_restart()
    return perturb(tiny_encoder, 2)


def _unmerged(model, monkeypatch, **kwargs):
    """`encode` through peft's own layers."""
    with monkeypatch.context() as m:
        m.setattr(merged_weights, "_on_cpu", lambda layer: False)
        return model.encode(TEXTS, **kwargs)


def _assert_close(merged, unmerged):
    """Equal up to float32 rounding (the same sums in another order): 1e-5 of the embeddings' scale."""
    scale = float(np.abs(unmerged).max())
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-5 * scale)


def _cached_layers(model):
    return [m for m in model.modules() if m in merged_weights._MERGED]


def test_equal_to_the_unmerged_layers_and_the_model_unchanged(trained, monkeypatch, tmp_path):
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    requires_grad = {n: p.requires_grad for n, p in trained.named_parameters()}
    trained.save_pretrained(tmp_path / "before")
    expected = _unmerged(trained, monkeypatch, batch_size=2)
    _assert_close(trained.encode(TEXTS, batch_size=2), expected)
    layers = [m for m in trained.modules() if isinstance(m, (LoraLinear, TrainableTokensLayer))]
    assert all("forward" not in m.__dict__ and "get_merged_weights" not in m.__dict__ for m in layers)
    lora = [m for m in layers if isinstance(m, LoraLinear)]
    assert set(lora) <= set(_cached_layers(trained)) and len(_cached_layers(trained)) == len(lora) + 1
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in state.items())
    assert requires_grad == {n: p.requires_grad for n, p in trained.named_parameters()}
    trained.save_pretrained(tmp_path / "after")
    for name in ("adapter_model.safetensors", "llm2comp_config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes(), name


def test_merged_again_when_a_weight_changes(trained, monkeypatch):
    """An in-place update (an optimizer step), `load_state_dict` and a disabled adapter are seen at once."""
    first = trained.encode(TEXTS)
    perturb(trained, 3)
    _assert_close(trained.encode(TEXTS), _unmerged(trained, monkeypatch))
    assert np.abs(trained.encode(TEXTS) - first).max() > 1e-3
    other = perturb(copy.deepcopy(trained), 4)
    trained.load_state_dict(other.state_dict())
    _assert_close(trained.encode(TEXTS), _unmerged(other, monkeypatch))
    with trained.model.disable_adapter():
        base = trained.encode(TEXTS)
    with trained.model.disable_adapter(), monkeypatch.context() as m:
        m.setattr(merged_weights, "_on_cpu", lambda layer: False)
        np.testing.assert_array_equal(base, trained.encode(TEXTS))


def test_training_sees_the_same_model(trained):
    """A model in training mode encodes merged and keeps no copies; its training forward is bit for bit the same."""
    trained.train()
    batch = trained.tokenize(TEXTS)
    before = trained(**batch)
    trained.encode(TEXTS)
    assert trained.training and not _cached_layers(trained)
    after = trained(**batch)
    assert torch.equal(before, after)
    after.sum().backward()
    assert all(p.grad is not None for p in trained.parameters() if p.requires_grad)


def test_shared_memory_weights_are_not_merged(trained, monkeypatch):
    """Weights in shared memory (a CPU pool's) may change in another process without their version changing."""
    expected = _unmerged(trained, monkeypatch)
    trained.share_memory()
    np.testing.assert_array_equal(trained.encode(TEXTS), expected)
    assert not _cached_layers(trained)


def test_bfloat16_lora_is_not_merged(trained, monkeypatch):
    """In bfloat16 ``W + s B A`` would round away much of the update: only the memory rows (put in exactly) are."""
    trained.to(torch.bfloat16)
    np.testing.assert_array_equal(trained.encode(TEXTS), _unmerged(trained, monkeypatch))
    assert [type(m) for m in _cached_layers(trained)] == [TrainableTokensLayer]
