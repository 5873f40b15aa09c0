"""`export_hf`: an `LLM2Comp` encoder as a plain transformers model directory that runs without llm2comp.

What makes it run anywhere transformers does, with no custom code:
- weights: the decoder body (no LM head) with the LoRA adapters and memory-token rows folded in;
- attention: ``"is_causal": false`` in config.json, transformers' own switch (its ``create_causal_mask`` then
  builds a bidirectional key-padding mask from a plain 2D ``attention_mask``); the export checks this holds for
  the model's family by comparing embeddings before it finishes;
- tokens: the tokenizer's post-processor adds the BOS and the M memory tokens and pads on the right, so
  ``tokenizer(texts, padding=True)`` is the encoder's input;
- pooling: a few lines of PyTorch in the model card (`memory_pooling`: the mean of the last M real positions),
  the source of the functions below;
- sentence-transformers: ``modules.json`` with only its own modules (no ``trust_remote_code``): its Transformer
  on the directory, token weights (WordWeights) that keep the pooled tokens, and their mean (Pooling). Memory
  pooling keeps the memory tokens, mean pooling all but BOS and the memory tokens; last pooling (the token before
  the memory tokens) has no such form and gets no sentence-transformers files.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import shutil
import warnings
from pathlib import Path

import torch

from ..outputs import require_empty

__all__ = ["export_hf", "last_pooling", "mean_pooling", "memory_pooling", "pool_hidden_states"]


def memory_pooling(hidden, mask, M):
    """The mean of the M memory tokens' final hidden states, which end each right-padded row."""
    positions = mask.sum(1, keepdim=True) - M + torch.arange(M, device=mask.device)  # [B, M]
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return picked.float().mean(1)  # [B, D]


def mean_pooling(hidden, mask, M, num_bos):
    """The mean of the text tokens' final hidden states: no BOS, no memory tokens, no padding."""
    text = mask.clone()
    text[:, :num_bos] = 0
    rows = torch.arange(len(mask), device=mask.device)[:, None]
    text[rows, mask.sum(1, keepdim=True) - M + torch.arange(M, device=mask.device)] = 0
    return (hidden.float() * text[..., None]).sum(1) / text.sum(1, keepdim=True)


def last_pooling(hidden, mask, M):
    """The final hidden state of the last text token, just before the memory tokens."""
    return hidden[torch.arange(len(mask), device=mask.device), mask.sum(1) - M - 1].float()


POOLINGS = {"memory": (memory_pooling, "M"), "mean": (mean_pooling, "M, num_bos"), "last": (last_pooling, "M")}


def pool_hidden_states(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, num_memory_tokens: int,
                       num_bos: int) -> torch.Tensor:
    """float32 `[B, D]` embeddings of final hidden states `hidden` `[B, L, D]` of right-padded rows with
    `attention_mask` `mask` `[B, L]`, by the model card's pooling function."""
    function = POOLINGS[pooling][0]
    return function(hidden, mask, num_memory_tokens, num_bos) if pooling == "mean" else function(
        hidden, mask, num_memory_tokens)


def _set_post_processor(tokenizer, bos_ids: list[int], memory_token_ids: list[int]) -> None:
    """Make the fast `tokenizer` add ``BOS`` before and the memory tokens after every text, padding right."""
    from tokenizers import processors

    if not tokenizer.is_fast:
        raise ValueError("export_hf needs a fast tokenizer (tokenizer.json): its post-processor adds the memory "
                         "tokens")
    ids = [*bos_ids, *memory_token_ids]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    names = dict(zip(tokens, ids, strict=True))
    single = " ".join([*tokens[:len(bos_ids)], "$A", *tokens[len(bos_ids):]])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=None, special_tokens=list(names.items()))
    tokenizer.padding_side = "right"


ST_MAX_SEQ_LENGTH = 512  # encode's default max_length


def _token_weights(model, tokenizer) -> tuple[list[str], dict[str, float], float, list[float]]:
    """sentence-transformers' WordWeights arguments (vocab in id order, weights, weight of the rest) that keep
    the tokens `model.pooling` averages: the memory tokens (memory), all but BOS and the memory tokens (mean);
    and the weight per id they give. ValueError if WordWeights would weigh some other token differently (its
    lower-case fallback)."""
    vocab = [token or "" for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    memory = set(model.memory_token_ids)
    if model.pooling == "memory":
        weights, rest, kept = {vocab[i]: 1.0 for i in memory}, 0.0, lambda i: i in memory
    else:
        dropped = memory | set(model.bos_ids)
        weights, rest, kept = {vocab[i]: 0.0 for i in dropped}, 1.0, lambda i: i not in dropped
    table = [weights.get(token, weights.get(token.lower(), rest)) for token in vocab]  # WordWeights' own lookup
    for i, weight in enumerate(table):
        if weight != float(kept(i)):
            raise ValueError(f"token {vocab[i]!r} (id {i}) would be weighed {weight} by sentence-transformers' "
                             "WordWeights")
    return vocab, weights, rest, table


def _write_sentence_transformers(model, tokenizer, out: Path) -> None:
    """sentence-transformers' files in `out` (see the module docstring); memory and mean pooling only."""
    from safetensors.torch import save_file

    vocab, weights, rest, table = _token_weights(model, tokenizer)
    modules = [("", "Transformer"), ("1_WordWeights", "WordWeights"), ("2_Pooling", "Pooling")]
    (out / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{name}"}
         for i, (path, name) in enumerate(modules)], indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": min(ST_MAX_SEQ_LENGTH, model.max_positions), "do_lower_case": False}, indent=2))
    (out / "config_sentence_transformers.json").write_text(json.dumps(model.sentence_transformers_config(),
                                                                      indent=2))
    (out / "1_WordWeights").mkdir()
    (out / "1_WordWeights" / "config.json").write_text(json.dumps(
        {"vocab": vocab, "word_weights": weights, "unknown_word_weight": rest}))
    save_file({"emb_layer.weight": torch.tensor(table, dtype=torch.float32)[:, None].contiguous()},
              str(out / "1_WordWeights" / "model.safetensors"))
    (out / "2_Pooling").mkdir()
    (out / "2_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": model.hidden_size, "pooling_mode": "mean", "include_prompt": True},
        indent=2))


def _model_card(model, pooling: str, prompts: dict[str, str]) -> str:
    import transformers

    function, arguments = POOLINGS[pooling]
    notes = []
    if prompts:
        notes.append("Prompts it was trained with (put one before each text"
                     + (", counted in mean pooling here where the encoder leaves it out" if pooling == "mean" else "")
                     + "): " + ", ".join(f"{k}: {v!r}" for k, v in prompts.items())
                     + (f"; by default {model.default_prompt_name!r}." if model.default_prompt_name else "."))
    if model.truncate_dim:
        notes.append(f"It keeps the first {model.truncate_dim} dimensions by default: `embeddings[:, "
                     f":{model.truncate_dim}]` before normalizing.")
    prompt_lines = [line for note in notes for line in (note, "")]
    return "\n".join([
        "---", "pipeline_tag: feature-extraction", "tags: [llm2comp, text-embeddings, sentence-similarity]", "---",
        "", "# LLM2Comp text encoder (standalone)", "",
        f"A bidirectional text encoder: {model.num_memory_tokens} memory tokens follow each text, and the embedding "
        f"is {'the mean of their final hidden states' if pooling == 'memory' else f'{pooling} pooling'}. It needs "
        "only transformers: config.json sets `is_causal: false` (bidirectional attention) and the tokenizer adds "
        f"the BOS and memory tokens itself, padding on the right. Exported and checked with transformers "
        f"{transformers.__version__}; one without the `is_causal` switch needs the 4D mask at the end.", "",
        *prompt_lines,
        "```python", "import torch", "from transformers import AutoModel, AutoTokenizer", "", "",
        inspect.getsource(function).rstrip(), "", "",
        'tokenizer = AutoTokenizer.from_pretrained("path/or/repo-id")',
        'model = AutoModel.from_pretrained("path/or/repo-id", attn_implementation="sdpa").eval()',
        f"M, num_bos = {model.num_memory_tokens}, {len(model.bos_ids)}  # memory tokens end each row, "
        "BOS tokens start it",
        'batch = tokenizer(["first text", "second text"], padding=True, truncation=True, max_length=512, '
        'return_tensors="pt")',
        "with torch.no_grad():",
        "    hidden = model(**batch).last_hidden_state  # [B, L, D]",
        f'embeddings = {function.__name__}(hidden, batch["attention_mask"], {arguments})',
        "embeddings = torch.nn.functional.normalize(embeddings, dim=-1)", "```", "",
        "With a transformers that has no `is_causal` switch, pass a 4D key-padding mask instead, which it uses "
        "as given (no causal mask is added): `mask = batch[\"attention_mask\"]; model(input_ids=batch[\"input_ids\"], "
        "attention_mask=mask[:, None, None, :].bool().expand(-1, 1, mask.shape[1], -1))`.", "",
        *_sentence_transformers_card(pooling, bool(prompts))])


def _sentence_transformers_card(pooling: str, has_prompts: bool) -> list[str]:
    if pooling == "last":
        return ["sentence-transformers has no pooling for the token before the memory tokens, so this directory "
                "has no sentence-transformers modules; use the code above.", ""]
    kept = "the memory tokens" if pooling == "memory" else "every token but BOS and the memory tokens"
    return [f"With sentence-transformers (its own modules only, no `trust_remote_code`: token weights that keep "
            f"{kept}, then their mean{'; the prompts above are its prompts' if has_prompts else ''}; sdpa or "
            "eager attention: flash-attention drops the padding mask the pooling reads):", "", "```python",
            "from sentence_transformers import SentenceTransformer", "",
            'model = SentenceTransformer("path/or/repo-id")',
            'embeddings = model.encode(["first text", "second text"], normalize_embeddings=True)', "```", ""]


def export_hf(model, directory: str | Path, *, dtype: torch.dtype | None = None, check: bool = True) -> Path:
    """Write `model` (an `LLM2Comp`) into the new or empty `directory` as a transformers model that
    ``AutoModel``/``AutoTokenizer`` load without llm2comp (see the module docstring); returns `directory`.

    `dtype`: the weights' (default: the model's). `check`: load the written directory with plain transformers
    (and sentence-transformers, where it is installed) and compare its embeddings, pooled as the model card says,
    with the encoder's on a few texts of mixed lengths; an error if they differ (a family whose transformers code
    ignores ``is_causal``).
    """
    out = Path(directory)
    require_empty(out)
    tokenizer = copy.deepcopy(model.tokenizer)  # the caller's keeps its own post-processor and padding side
    _set_post_processor(tokenizer, model.bos_ids, model.memory_token_ids)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        body = model.merged_copy(dtype).get_decoder()
        body.config.is_causal = False
        body.config.architectures = [type(body).__name__]
        body.save_pretrained(out, safe_serialization=True)
        exact = body.dtype == model.model.dtype == torch.float32
        del body  # before the check loads the written copy
        tokenizer.save_pretrained(out)
        if model.pooling != "last":
            _write_sentence_transformers(model, tokenizer, out)
        (out / "README.md").write_text(_model_card(model, model.pooling, model.prompts))
        (out / "llm2comp_export.json").write_text(json.dumps({
            "pooling": model.pooling, "num_memory_tokens": model.num_memory_tokens, "num_bos": len(model.bos_ids),
            "prompts": model.prompts, "default_prompt_name": model.default_prompt_name,
            "truncate_dim": model.truncate_dim}, indent=2))
        if check:
            _check_export(model, out, atol=1e-4 if exact else 5e-2)
    except BaseException:
        # the directory was new or empty: leave no partial export, nor one that computes something else
        shutil.rmtree(out)
        if not created:
            out.mkdir()
        raise
    return out


CHECK_TEXTS = ["A short text.", "A somewhat longer text, so that the rows of this batch have different lengths.",
               "Bidirectional attention reads every token of a row, padding excepted."]


def _excess_error(got: torch.Tensor, want: torch.Tensor, atol: float) -> float | None:
    """The largest ``|got - want|`` when it exceeds `atol` times ``max(1, max |want|)``, else None."""
    error = (got - want).abs().max().item()
    return error if error > atol * max(1.0, want.abs().max().item()) else None


def _check_export(model, out: Path, atol: float) -> None:
    """RuntimeError unless plain transformers, on the files in `out`, gives `model.encode`'s embeddings (to
    `atol` relative to their largest entry) and `model.tokenize`'s rows; the same of sentence-transformers where
    `out` has its modules and it is installed."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    plain = AutoModel.from_pretrained(out, attn_implementation="sdpa", dtype=torch.float32).eval()
    batch = tokenizer(CHECK_TEXTS, padding=True, return_tensors="pt")
    expected = model.tokenize(CHECK_TEXTS, max_length=model.max_positions)
    if not torch.equal(batch["input_ids"], expected.input_ids):
        raise RuntimeError(f"the exported tokenizer in {out} does not make the encoder's rows")
    with torch.no_grad():
        hidden = plain(**batch).last_hidden_state
    got = pool_hidden_states(hidden, batch["attention_mask"], model.pooling, model.num_memory_tokens,
                             len(model.bos_ids))
    was_training = model.training
    try:
        with torch.inference_mode():  # the encoder itself, without encode's defaults (prompt, truncate_dim)
            want = model.eval()(**expected.to(model.device)).float().cpu()
    finally:
        model.train(was_training)
    error = _excess_error(got, want, atol)
    if error is not None:
        raise RuntimeError(f"the model exported to {out} does not reproduce the encoder (max difference {error:.2e}):"
                           f" transformers' {type(plain).__name__} may not honour config.is_causal = False")
    del plain
    if (out / "modules.json").exists() and importlib.util.find_spec("sentence_transformers") is not None:
        _check_sentence_transformers(out, want, atol)


def _check_sentence_transformers(out: Path, want: torch.Tensor, atol: float) -> None:
    """RuntimeError unless sentence-transformers, loading `out` without remote code, gives `want` (the encoder's
    float32 `[3, D]` embeddings of `CHECK_TEXTS`, no prompt, all dimensions); a warning if it will not import."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # installed but broken (e.g. too old for this transformers): the files stay
        warnings.warn(f"sentence-transformers does not import ({exc}); its files in {out} are unchecked",
                      stacklevel=4)
        return
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=False, local_files_only=True,
                             model_kwargs={"dtype": torch.float32})
    st.default_prompt_name, st.truncate_dim = None, None  # compare the encoder itself
    got = st.encode(CHECK_TEXTS, convert_to_tensor=True).float().cpu()
    error = _excess_error(got, want, atol)
    if error is not None:
        raise RuntimeError(f"sentence-transformers on {out} does not reproduce the encoder (max difference "
                           f"{error:.2e})")
