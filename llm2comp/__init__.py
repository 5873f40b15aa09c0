"""LLM2Comp: decoder LLMs as text encoders (bidirectional attention, LoRA, memory tokens) on llm2comp_kernels.

Main entry points: `LLM2Comp` (load, tokenize, encode, save), `patch_bidirectional` /
`unpatch_bidirectional` / `causal_attention` (attention switch for any supported decoder) and
`add_memory_tokens`. Training lives in `llm2comp.training`, evaluation in `llm2comp.evaluation`,
sentence-transformers / MTEB wrappers in `llm2comp.interop`.
"""

from .bidirectional import causal_attention, is_patched, patch_bidirectional, unpatch_bidirectional
from .default_model import DEFAULT_MODEL
from .memory_tokens import add_memory_tokens
from .model import LLM2Comp

__all__ = ["DEFAULT_MODEL", "LLM2Comp", "add_memory_tokens", "causal_attention", "is_patched",
           "patch_bidirectional", "unpatch_bidirectional"]
