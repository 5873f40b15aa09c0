"""Drop-in replacements for other libraries' components, running on `llm2comp_kernels`.

Each submodule needs its library installed and is imported on its own, so that importing
`llm2comp` never pulls in an optional dependency:

- `llm2comp.integrations.sentence_transformers`: `FusedMultipleNegativesRankingLoss` and
  `FusedMultipleNegativesSymmetricRankingLoss` (needs sentence-transformers).
"""
