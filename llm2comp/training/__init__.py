"""Training of LLM2Comp encoders: compression pretraining, unsupervised and supervised contrastive stages.

Entry points: `train` (one stage from a `TrainConfig`), the ``llm2comp train`` command
(`llm2comp.training.cli`) and the demo (`llm2comp.training.demo`).
"""

from .config import TrainConfig, load_config
from .trainer import train

__all__ = ["TrainConfig", "load_config", "train"]
