"""Training of LLM2Comp encoders: compression pretraining, unsupervised and supervised contrastive stages.

Entry points: `train` (one stage from a `TrainConfig`), the ``llm2comp train`` command
(`llm2comp.training.cli`) and the demo (`llm2comp.training.demo`).
"""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "train"]


def __getattr__(name: str):
    if name == "train":  # imported on first use (it needs torch): the command line's parser does not
        from .trainer import train
        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
