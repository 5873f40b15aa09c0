import copy

import pytest

from llm2comp import LLM2Comp
from tests.tiny_models import CONFIGS, tiny_model_dir


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Saved tiny model directories, one per supported model type."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: tiny_model_dir(kind, root) for kind in CONFIGS}


@pytest.fixture(scope="session")
def _tiny_encoder(tiny_dirs):
    return LLM2Comp.from_pretrained(str(tiny_dirs["llama"]), num_memory_tokens=4, lora_rank=4, lora_dropout=0.0)


@pytest.fixture
def tiny_encoder(_tiny_encoder):
    """A tiny Llama LLM2Comp (M=4), loaded once and deep-copied per test."""
    return copy.deepcopy(_tiny_encoder)
