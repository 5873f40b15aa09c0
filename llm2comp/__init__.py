"""LLM2Comp: decoder LLMs as text encoders (bidirectional attention, LoRA, memory tokens) on llm2comp_kernels.

Main entry points: `LLM2Comp` (load, tokenize, encode, save), `patch_bidirectional` /
`unpatch_bidirectional` / `causal_attention` (attention switch for any supported decoder) and
`add_memory_tokens`. Training lives in `llm2comp.training`, evaluation in `llm2comp.evaluation`,
sentence-transformers / MTEB wrappers in `llm2comp.integrations`.
"""

import importlib

# name -> its module, imported on first use (PEP 562): `import llm2comp.cli` for `llm2comp --help` then loads
# neither torch nor transformers
_EXPORTS = {"DEFAULT_MODEL": ".default_model", "LLM2Comp": ".model", "add_memory_tokens": ".memory_tokens",
            "causal_attention": ".bidirectional", "is_patched": ".bidirectional",
            "patch_bidirectional": ".bidirectional", "unpatch_bidirectional": ".bidirectional"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
