"""Tiny random-init decoders and a tokenizer trained on the Lee background corpus, saved to disk.

Shared by the model and training tests: `tiny_model_dir(kind, root)` writes a model directory
that ``from_pretrained(dir)`` loads like a hub checkpoint. 2 layers, hidden 64, 4 query / 2 kv
heads of dim 16, so every attention path (GQA, padding) is exercised in milliseconds on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from tokenizers import decoders as tok_decoders
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from llm2comp.data.lee import lee_dir

LEE_DIR = lee_dir()  # $LLM2COMP_LEE_DIR, ../shared/data/lee, or the gensim wheel's files (a stranger's checkout)
VOCAB_SIZE = 512
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma": GemmaConfig}
# Qwen tokenizers add no BOS; the others do.
ADDS_BOS = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False, "gemma": True}


def train_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE (512 tokens) on lee_background.cor; BOS prepended iff `add_bos`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tok_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(LEE_DIR / "lee_background.cor")], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if add_bos else None, eos_token="</s>",
                                   pad_token="<pad>", padding_side="right")


def tiny_config(kind: str, tokenizer: PreTrainedTokenizerFast, **overrides):
    """A 2-layer config of model type `kind` for `tokenizer` (`overrides`: other config fields)."""
    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=kind != "llama")
    return CONFIGS[kind](**{**fields, **overrides})


def tiny_model_dir(kind: str, root: Path, seed: int = 0) -> Path:
    """Save a random tiny `kind` model and its tokenizer under ``root/kind``; returns that directory."""
    out = root / kind
    tokenizer = train_tokenizer(ADDS_BOS[kind])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tokenizer))
    # Random init is tiny (std 0.02): scale up so layers visibly mix tokens and tests can fail.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def perturb(encoder, seed: int = 1):
    """`encoder`'s trainable weights (LoRA, memory rows) moved by N(0, 0.05^2) noise of `seed`, in place, as
    after training (a fresh LoRA's B is zero). Returns it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)
    return encoder


def as_trained(encoder, seed: int = 1):
    """`encoder` (an LLM2Comp) as after two stages, in place: its trainable weights (LoRA, memory rows) moved,
    that LoRA folded into the base (`merge_lora_and_restart`), then the fresh one moved too. Returns it."""
    perturb(encoder, seed).merge_lora_and_restart()
    return perturb(encoder, seed + 1)
