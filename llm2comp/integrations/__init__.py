"""LLM2Comp in other libraries, and drop-in replacements for their components running on `llm2comp_kernels`.

Each submodule needs its library installed and is imported on its own, so that importing
`llm2comp` never pulls in an optional dependency:

- `llm2comp.integrations.sentence_transformers`: `LLM2CompModule` and `sentence_transformer` (an `LLM2Comp` as a
  SentenceTransformer), `FusedMultipleNegativesRankingLoss` and `FusedMultipleNegativesSymmetricRankingLoss`
  (needs sentence-transformers).
- `llm2comp.integrations.mteb`: `MTEBEncoder`, an `LLM2Comp` under MTEB's encoder protocol (needs mteb for its
  model metadata only).
"""
