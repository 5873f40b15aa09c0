"""``llm2comp.interop.LLM2CompModule``: the class name in the ``modules.json`` of LLM2Comp directories saved
before the module moved to `llm2comp.integrations.sentence_transformers`, kept so that sentence-transformers
still loads them."""

from .integrations.sentence_transformers import LLM2CompModule

__all__ = ["LLM2CompModule"]
