"""`LLM2Comp`: a decoder LLM turned text encoder (bidirectional attention, LoRA, M memory tokens).

Data flow: texts -> `tokenize` (BOS, optional instruction, text, M memory tokens, right padding)
-> the patched decoder body (`memory_attention` in every layer) -> `span_mean_pool` over the
memory span of the last hidden states -> `[B, D]`.

A saved directory holds ``llm2comp_config.json`` (base model reference, M, token ids, LoRA
settings, pooling), the tokenizer, the peft adapter (LoRA weights and the memory-token rows,
safetensors) and a ``modules.json`` so that sentence-transformers loads it too;
`merge_and_save` writes a standalone merged model instead.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import tokenization
from .bidirectional import is_patched, patch_bidirectional, unpatch_bidirectional
from .default_model import DEFAULT_MODEL, HUB_ID, default_model_files, is_default_model
from .encode import (
    POOLINGS,
    check_encode_kwargs,
    check_pooling,
    check_prompts,
    check_truncate_dim,
    cosine_similarity,
    encode_texts,
)
from .memory_tokens import MEMORY_INITS, add_memory_tokens, init_memory_rows
from .pooling import pool

CONFIG_NAME = "llm2comp_config.json"
MERGED_LORA_NAME = "merged_lora.safetensors"  # earlier stages' LoRA factors, folded into the base on load
# Lets ``SentenceTransformer(directory, trust_remote_code=True)`` load a saved model through
# `llm2comp.integrations.sentence_transformers.LLM2CompModule` (a class outside sentence-transformers, hence
# trust_remote_code).
ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "llm2comp.integrations.sentence_transformers.LLM2CompModule"}]
LORA_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

__all__ = ["CONFIG_NAME", "LLM2Comp", "POOLINGS"]


def _looks_like_path(name: str) -> bool:
    """A local path, not a hub id (``org/name``): absolute, relative with ``.``/``~``, or several ``/``."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or Path(name).exists()


_WEIGHTS_KEYS = ("gguf_file", "revision", "subfolder")  # transformers' loading arguments that pick the weights
_REPO_KEYS = ("revision", "subfolder")  # ... that address one repo: the saved encoder's, not its base model's
_BASE_KEYS = ("name_or_path", *_WEIGHTS_KEYS)  # what a saved config's base_model may hold: nothing that runs code


def _saved_dir(name_or_path: str, hf_kwargs: dict) -> Path | None:
    """The LLM2Comp directory `name_or_path` names: a local one, or a hub repo holding ``llm2comp_config.json``
    (downloaded); None for anything else (a plain decoder)."""
    path = Path(name_or_path).expanduser()
    if (path / CONFIG_NAME).is_file():
        return path
    if _looks_like_path(name_or_path) or is_default_model(name_or_path):
        return None
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    hub = {k: v for k, v in hf_kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only")}
    try:
        huggingface_hub.hf_hub_download(name_or_path, CONFIG_NAME, **hub)
    except (EntryNotFoundError, OSError, ValueError):  # not an LLM2Comp repo, not a repo id, or the hub unreachable
        return None
    return Path(huggingface_hub.snapshot_download(name_or_path, **hub))


def _load_base(name_or_path: str, dtype, hf_kwargs: dict):
    """Tokenizer and causal LM for a hub id, a local directory, or the default model."""
    # what names the weights (never a token): an adapter is reloaded onto the same ones
    reference = {"name_or_path": name_or_path, **{k: v for k, v in hf_kwargs.items() if k in _WEIGHTS_KEYS and v}}
    if is_default_model(name_or_path):
        directory, gguf_file = default_model_files()
        name_or_path, hf_kwargs = str(directory), {**hf_kwargs, "gguf_file": gguf_file}
    elif _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model directory {name_or_path} does not exist")
        if not (path / (hf_kwargs.get("subfolder") or "") / "config.json").is_file() and not hf_kwargs.get("gguf_file"):
            raise FileNotFoundError(f"{name_or_path} holds no model: neither {CONFIG_NAME} (an LLM2Comp model) nor "
                                    "config.json (a transformers one)")
        name_or_path = reference["name_or_path"] = str(path.resolve())
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hf_kwargs)
    except OSError as exc:  # transformers' message says what the hub answered, not what was asked for
        where = "" if Path(name_or_path).exists() else "not a local directory, and as a hub model id: "
        raise OSError(f"cannot load the model {name_or_path!r}: {where}{exc}") from exc
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **hf_kwargs)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model, reference


def _read_json(path: Path):
    """The JSON in `path`; an error naming it where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


_CONFIG_TYPES = {"format": str, "version": int, "merged": bool, "num_memory_tokens": int, "memory_token_ids": list,
                 "pooling": str}


def _read_config(config_file: Path) -> dict:
    """A saved ``llm2comp_config.json``, checked: this format and version, its keys, memory tokens and pooling.
    Its base_model may only name the weights (`_BASE_KEYS`): a downloaded file must not turn on
    ``trust_remote_code`` (its base model's code would run) nor pass transformers anything else."""
    saved = _read_json(config_file)
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file}: not an llm2comp config (a JSON object)")
    if saved.get("format") != "llm2comp" or saved.get("version") != 1:
        raise ValueError(f"{config_file}: format {saved.get('format')!r} version {saved.get('version')!r}; this "
                         "llm2comp reads format 'llm2comp' version 1")
    for key, kind in _CONFIG_TYPES.items():
        if not isinstance(saved.get(key), kind):
            raise ValueError(f"{config_file}: {key!r} is {'missing' if key not in saved else 'not a ' + kind.__name__}")
    ids = saved["memory_token_ids"]
    if not ids or len(ids) != saved["num_memory_tokens"] or not all(type(i) is int and i >= 0 for i in ids):
        raise ValueError(f"{config_file}: memory_token_ids {ids} are not num_memory_tokens "
                         f"({saved['num_memory_tokens']}) token ids")
    if saved["pooling"] not in POOLINGS:
        raise ValueError(f"{config_file}: pooling {saved['pooling']!r} is not one of {POOLINGS}")
    if saved.get("memory_init", "mean") not in MEMORY_INITS:
        raise ValueError(f"{config_file}: memory_init {saved['memory_init']!r} is not one of {MEMORY_INITS}")
    for key in ("prepend_bos", "merged_lora"):  # absent in models saved before them
        if saved.get(key) is not None and not isinstance(saved[key], bool):
            raise ValueError(f"{config_file}: {key!r} is not a bool")
    try:  # absent in models saved before them
        check_prompts(saved.get("prompts", {}), saved.get("default_prompt_name"))
        check_truncate_dim(saved.get("truncate_dim"), sys.maxsize)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_file}: {exc}") from None
    if saved.get("merged_lora") and not (config_file.parent / MERGED_LORA_NAME).is_file():
        raise FileNotFoundError(f"{config_file.parent / MERGED_LORA_NAME} is missing (the LoRA of earlier stages, "
                                "folded into the base weights)")
    base = saved.get("base_model")
    if not saved["merged"] and not (isinstance(base, dict) and isinstance(base.get("name_or_path"), str)):
        raise ValueError(f"{config_file}: base_model.name_or_path is missing (an adapter names its base model)")
    for key in base or {}:
        if key not in _BASE_KEYS:
            raise ValueError(f"{config_file}: base_model.{key} is not a key llm2comp reads (only "
                             f"{', '.join(_BASE_KEYS)}); trust_remote_code is taken from the caller only")
    return saved


def _check_memory_ids(saved_dir: Path, ids: list[int], tokenizer, adapter: bool) -> None:
    """The saved memory token ids are in the tokenizer's vocabulary and, for an adapter, the rows it trained."""
    if max(ids) >= len(tokenizer):
        raise ValueError(f"{saved_dir / CONFIG_NAME}: memory_token_ids {ids} are outside the tokenizer's vocabulary "
                         f"({len(tokenizer)} tokens)")
    if adapter:
        if not (saved_dir / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{saved_dir / 'adapter_model.safetensors'} is missing (the trained adapter)")
        trained = _read_json(saved_dir / "adapter_config.json").get("trainable_token_indices")
        trained = next(iter(trained.values()), None) if isinstance(trained, dict) else trained
        if trained != ids:
            raise ValueError(f"{saved_dir / CONFIG_NAME}: memory_token_ids {ids} are not the memory rows the adapter "
                             f"trained ({trained}, adapter_config.json)")


@contextlib.contextmanager
def _saving_into(directory: Path):
    """A new folder inside `directory` to write a model into; once written, its files replace those of
    `directory`, the llm2comp config removed first and written last. A save killed while writing leaves the
    previous model whole, and one killed while moving leaves no llm2comp config: never a mixed model that loads."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".saving-*"):  # what a save killed earlier left
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=".saving-", dir=directory))
    try:
        yield folder
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        for path in sorted(folder.iterdir(), key=lambda p: p.name == CONFIG_NAME):
            target = directory / path.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(path, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read_merged_lora(directory: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The folded LoRA factors `LLM2Comp.merge_lora_and_restart` saved in `directory`."""
    tensors = load_file(str(directory / MERGED_LORA_NAME))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: (tensors[f"{name}.A"], tensors[f"{name}.B"]) for name in names}


def _fold_lora(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
               linear_of=None) -> None:
    """Add ``B @ A`` to the weight of each named linear layer of `model` (`linear_of(name)`: the layer, default
    ``model.get_submodule(name)``), computed in fp32 and rounded once to the weight's dtype."""
    with torch.no_grad():
        for name, (a, b) in factors.items():
            linear = linear_of(name) if linear_of else model.get_submodule(name)
            weight = linear.weight
            weight.copy_((weight.float() + (b.to(weight.device) @ a.to(weight.device))).to(weight.dtype))


def _cpu_float32_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` with its parameters and buffers on the CPU (floating ones in float32), copied one
    tensor at a time, never whole on `module`'s device; tied parameters stay tied."""
    memo = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in memo:
            data = tensor.detach().to(device="cpu", copy=True,
                                      dtype=torch.float32 if tensor.is_floating_point() else tensor.dtype)
            is_parameter = isinstance(tensor, torch.nn.Parameter)
            memo[id(tensor)] = torch.nn.Parameter(data, tensor.requires_grad) if is_parameter else data
    return copy.deepcopy(module, memo)


@contextlib.contextmanager
def _peft_deprecation_quiet():
    """Without transformers 5's FutureWarning about `is_gradient_checkpointing`, which peft's wrapper reads on
    every load: the user can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _lora_config(model, memory_token_ids, rank, alpha, dropout, targets) -> LoraConfig:
    """LoRA on the `targets` that `model` has, and the memory rows trained as adapter parameters."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in targets if t in present]
    if not found:
        raise ValueError(f"none of the LoRA target modules {list(targets)} exist in {type(model).__name__}")
    # trainable_token_indices: the memory rows become adapter parameters (tied LM head included),
    # the rest of the embedding stays frozen.
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=found,
                      trainable_token_indices=list(memory_token_ids), task_type="CAUSAL_LM")


def _saved_layout(saved: dict) -> dict:
    """The row layout a saved model was trained with; a model saved before these options gets the earlier
    behaviour."""
    return {"prepend_bos": saved.get("prepend_bos"), "memory_init": saved.get("memory_init", "mean")}


def _adapter_base(saved: dict, config_file: Path, base_model: str | None) -> tuple[str, dict]:
    """The base model an adapter loads onto: `base_model` if given, else the one its config names, with that
    config's loading arguments (`_BASE_KEYS`)."""
    ref = dict(saved["base_model"])
    base_name = ref.pop("name_or_path")
    if base_model is not None:
        return base_model, {}
    if _looks_like_path(base_name) and not Path(base_name).exists():
        raise FileNotFoundError(
            f"the base model {base_name} named in {config_file} (base_model.name_or_path) does not "
            "exist; pass its new location as base_model= (--base-model on the command line)")
    return base_name, ref


class LLM2Comp(torch.nn.Module):
    """Text encoder: a peft-wrapped causal LM with bidirectional attention and memory tokens.

    Attributes for training code: ``model`` (the peft model; its LM head is the frozen decoder's),
    ``tokenizer``, ``memory_token_ids``, ``num_memory_tokens``, ``pooling``, `backbone()`,
    `lm_head`, `hidden_states()`.
    """

    def __init__(self, model: PeftModel, tokenizer, memory_token_ids: Sequence[int], *, pooling: str = "memory",
                 base_reference: dict | None = None, prepend_bos: bool | None = True, memory_init: str = "mean",
                 merged_lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                 truncate_dim: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.memory_token_ids = list(memory_token_ids)
        self.num_memory_tokens = len(self.memory_token_ids)
        self.pooling = check_pooling(pooling)
        self.base_reference = base_reference or {}
        self.prepend_bos, self.memory_init = prepend_bos, memory_init
        # earlier stages' LoRA, folded into the base weights: module name -> (A [R, in], B [out, R] x scaling)
        self.merged_lora = dict(merged_lora or {})
        self.bos_ids = tokenization.bos_ids(tokenizer, prepend_bos)
        # encode's defaults, saved with the model (sentence-transformers' names and meaning)
        self.prompts, self.default_prompt_name = check_prompts(prompts or {}, default_prompt_name)
        self.truncate_dim = check_truncate_dim(truncate_dim, self.hidden_size)

    def __repr__(self) -> str:
        """One line of what the encoder is; ``print(model.model)`` shows its modules."""
        extras = "".join([f", prompts={sorted(self.prompts)}" if self.prompts else "",
                          f", default_prompt_name={self.default_prompt_name!r}" if self.default_prompt_name else "",
                          f", truncate_dim={self.truncate_dim}" if self.truncate_dim else ""])
        dtype = str(self.model.dtype).removeprefix("torch.")
        return (f"LLM2Comp(base={self.base_reference.get('name_or_path')!r}, pooling={self.pooling!r}, "
                f"num_memory_tokens={self.num_memory_tokens}, hidden_size={self.hidden_size}, "
                f"lora_rank={self.model.peft_config['default'].r}, dtype={dtype}, device={self.device}{extras})")

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, num_memory_tokens: int = 8, lora_rank: int = 16,
                        lora_alpha: int = 32, lora_dropout: float = 0.05, lora_targets: Sequence[str] = LORA_TARGETS,
                        pooling: str | None = None, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, backend: str = "auto",
                        base_model: str | None = None, prepend_bos: bool | None = True, memory_init: str = "random",
                        prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                        truncate_dim: int | None = None, **hf_kwargs) -> LLM2Comp:
        """Load a decoder (hub id, local dir, ``gguf_file=``, or the default) or a saved LLM2Comp (local
        directory or hub repo).

        A new model gets `num_memory_tokens` memory tokens and fresh LoRA adapters (rank, alpha,
        dropout, targets present in the model), the memory rows initialised as `memory_init` says
        (`llm2comp.memory_tokens.MEMORY_INITS`), and rows that start, with `prepend_bos` True, with the
        token the decoder starts from (`start_token_id`, as compression training's decoder and teacher
        rows), False with the text, None with what the tokenizer adds itself (as models saved before the
        option). A saved LLM2Comp directory (it holds ``llm2comp_config.json``) restores its own settings;
        the LoRA arguments then apply only to a merged directory, which gets fresh adapters on top;
        `base_model` overrides where an adapter directory's base model is (when it moved since saving).
        `backend` picks the `memory_attention` backend; `hf_kwargs` go to transformers' ``from_pretrained``.
        `prompts` (name -> text), `default_prompt_name` and `truncate_dim` are `encode`'s defaults
        (sentence-transformers' meaning), saved with the model; given here, they replace the saved ones.
        Returns the model in eval mode (dropout off), like transformers.
        """
        if memory_init not in MEMORY_INITS:
            raise ValueError(f"memory_init must be one of {MEMORY_INITS}, got {memory_init!r}")
        lora = {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout, "targets": lora_targets}
        saved_dir = _saved_dir(name_or_path, hf_kwargs)
        if saved_dir is None:
            model = cls._new(name_or_path, num_memory_tokens, lora, pooling=pooling or "memory", dtype=dtype,
                             backend=backend, prepend_bos=prepend_bos, memory_init=memory_init, hf_kwargs=hf_kwargs)
        else:
            hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in _REPO_KEYS}  # the repo is read now
            saved = _read_config(saved_dir / CONFIG_NAME)
            kwargs = {"pooling": pooling or saved["pooling"], "dtype": dtype, "backend": backend,
                      "hf_kwargs": hf_kwargs}
            if saved["merged"]:
                model = cls._from_merged(saved_dir, saved, lora, **kwargs)
            else:
                model = cls._from_adapter(saved_dir, saved, base_model, **kwargs)
        saved = {} if saved_dir is None else saved
        # as sentence-transformers: the prompts given join (and win over) the saved ones
        model.prompts, model.default_prompt_name = check_prompts(
            {**saved.get("prompts", {}), **(prompts or {})},
            default_prompt_name if default_prompt_name is not None else saved.get("default_prompt_name"))
        model.truncate_dim = check_truncate_dim(truncate_dim if truncate_dim is not None
                                                else saved.get("truncate_dim"), model.hidden_size)
        return model._loaded(device)

    @classmethod
    def _new(cls, name_or_path: str, num_memory_tokens: int, lora: dict, *, pooling: str, dtype, backend: str,
             prepend_bos: bool | None, memory_init: str, hf_kwargs: dict) -> LLM2Comp:
        """A decoder with `num_memory_tokens` new memory tokens and fresh LoRA adapters."""
        tokenizer, base, reference = _load_base(name_or_path, dtype, hf_kwargs)
        ids = add_memory_tokens(base, tokenizer, num_memory_tokens, memory_init)
        return cls._with_new_lora(base, tokenizer, ids, lora, backend, pooling=pooling, base_reference=reference,
                                  prepend_bos=prepend_bos, memory_init=memory_init)

    @classmethod
    def _from_merged(cls, saved_dir: Path, saved: dict, lora: dict, *, pooling: str, dtype, backend: str,
                     hf_kwargs: dict) -> LLM2Comp:
        """A saved merged model (`merge_and_save`): its weights hold the memory rows and the trained LoRA;
        fresh adapters go on top."""
        tokenizer, base, reference = _load_base(str(saved_dir), dtype, hf_kwargs)
        ids = saved["memory_token_ids"]
        _check_memory_ids(saved_dir, ids, tokenizer, adapter=False)
        return cls._with_new_lora(base, tokenizer, ids, lora, backend, pooling=pooling, base_reference=reference,
                                  **_saved_layout(saved))

    @classmethod
    def _from_adapter(cls, saved_dir: Path, saved: dict, base_model: str | None, *, pooling: str, dtype,
                      backend: str, hf_kwargs: dict) -> LLM2Comp:
        """A saved adapter (`save_pretrained`) on its base model (`base_model`: where that is now, if given),
        with the earlier stages' LoRA folded in again."""
        tokenizer = AutoTokenizer.from_pretrained(str(saved_dir))
        ids = saved["memory_token_ids"]
        _check_memory_ids(saved_dir, ids, tokenizer, adapter=True)
        base_name, ref = _adapter_base(saved, saved_dir / CONFIG_NAME, base_model)
        _, base, reference = _load_base(base_name, dtype, {**ref, **hf_kwargs})
        layout = _saved_layout(saved)
        init_memory_rows(base, tokenizer, ids, layout["memory_init"])
        merged_lora = _read_merged_lora(saved_dir) if saved.get("merged_lora") else {}
        _fold_lora(base, merged_lora)
        patch_bidirectional(base, backend=backend)
        with _peft_deprecation_quiet():
            model = PeftModel.from_pretrained(base, str(saved_dir), is_trainable=True)
        return cls(model, tokenizer, ids, pooling=pooling, base_reference=reference, merged_lora=merged_lora,
                   **layout)

    @classmethod
    def _with_new_lora(cls, base, tokenizer, ids: list[int], lora: dict, backend: str, **kwargs) -> LLM2Comp:
        """`base` with bidirectional attention and fresh LoRA adapters (`_lora_config`), as an LLM2Comp."""
        patch_bidirectional(base, backend=backend)
        config = _lora_config(base, ids, **lora)
        with _peft_deprecation_quiet():
            model = get_peft_model(base, config)
        return cls(model, tokenizer, ids, **kwargs)

    def _loaded(self, device: torch.device | str | None) -> LLM2Comp:
        self.eval()
        return self if device is None else self.to(device)

    # ----------------------------------------------------------------------------- saving
    def _config(self, merged: bool) -> dict:
        lora = self.model.peft_config["default"]
        return {"format": "llm2comp", "version": 1, "merged": merged,
                "base_model": None if merged else self.base_reference,
                "num_memory_tokens": self.num_memory_tokens, "memory_token_ids": self.memory_token_ids,
                "pooling": self.pooling, "prepend_bos": self.prepend_bos, "memory_init": self.memory_init,
                "merged_lora": bool(self.merged_lora) and not merged,
                "prompts": self.prompts, "default_prompt_name": self.default_prompt_name,
                "truncate_dim": self.truncate_dim,
                "lora": {"rank": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                         "targets": sorted(lora.target_modules)}}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config JSON, tokenizer and adapter (LoRA + memory-token rows) as safetensors; other files in
        `directory` stay, and a save that fails or is killed midway never leaves a mixed model (`_saving_into`)."""
        with _saving_into(Path(directory)) as folder:
            # save_embedding_layers=False: the memory rows are saved as trainable-token parameters; the
            # base embedding is reloaded from the base model.
            self.model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
            if self.merged_lora:
                save_file({f"{name}.{part}": t.contiguous() for name, ab in self.merged_lora.items()
                           for part, t in zip("AB", ab, strict=True)}, str(folder / MERGED_LORA_NAME))
            self.tokenizer.save_pretrained(folder)
            self._write_configs(folder, merged=False)

    def merged_copy(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """A copy, on the CPU, of the base causal LM with the LoRA adapters and memory rows in its weights and its
        own (causal) attention again, in `dtype` (default: the model's). The LoRA is folded in float32 on the CPU:
        the model's own device holds no second copy."""
        dtype = dtype or self.model.dtype
        merged = _cpu_float32_copy(self.model).merge_and_unload().to(dtype)
        if is_patched(merged):
            unpatch_bidirectional(merged)
        quantization = getattr(merged.config, "quantization_config", None)
        if str(getattr(quantization, "quant_method", "")).lower().endswith("gguf"):
            del merged.config.quantization_config  # a GGUF file's weights were dequantized when loaded
        return merged.eval()

    def merge_and_save(self, directory: str | Path) -> None:
        """Write a standalone model with the adapters merged in (folded in a float32 copy in CPU memory: 4 bytes
        a parameter)."""
        merged = self.merged_copy()
        with _saving_into(Path(directory)) as folder:
            merged.save_pretrained(folder, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)
            self._write_configs(folder, merged=True)

    def _write_configs(self, directory: Path, merged: bool) -> None:
        (directory / CONFIG_NAME).write_text(json.dumps(self._config(merged), indent=2))
        (directory / "modules.json").write_text(json.dumps(ST_MODULES, indent=2))
        (directory / "config_sentence_transformers.json").write_text(
            json.dumps(self.sentence_transformers_config(), indent=2))
        (directory / "README.md").write_text(self._model_card(merged))  # instead of peft's text-generation card

    def sentence_transformers_config(self) -> dict:
        """encode's defaults as sentence-transformers reads them (its ``config_sentence_transformers.json``)."""
        return {"prompts": self.prompts, "default_prompt_name": self.default_prompt_name,
                "truncate_dim": self.truncate_dim, "similarity_fn_name": "cosine"}

    def _model_card(self, merged: bool) -> str:
        """A model card for the hub: an embedding model (feature-extraction), its base model's hub id if it has
        one, what it is and how to load it."""
        name = self.base_reference["name_or_path"]
        hub_id = HUB_ID if is_default_model(name) else None if _looks_like_path(name) else name
        lora = self.model.peft_config["default"]
        trained = ("LoRA merged into the weights" if merged else
                   f"LoRA adapters (rank {lora.r}, alpha {lora.lora_alpha}) on the base model")
        return "\n".join([
            "---", "library_name: llm2comp", "pipeline_tag: feature-extraction",
            "tags: [llm2comp, text-embeddings, sentence-similarity]", *([f"base_model: {hub_id}"] if hub_id else []),
            "---", "", "# LLM2Comp text encoder", "",
            f"A bidirectional text encoder made from `{hub_id or name}` by LLM2Comp (\"Learning to Compress\", "
            f"AAAI'26): {self.num_memory_tokens} memory tokens follow each text, and the mean of their last hidden "
            f"states is its embedding (\"memory\" pooling; this model's default: \"{self.pooling}\"); {trained}, "
            "and the memory tokens' embeddings, are what training changed.", "",
            "```python", "from llm2comp import LLM2Comp", "",
            'model = LLM2Comp.from_pretrained("path/or/repo-id")',
            'embeddings = model.encode(["first text", "second text"], normalize_embeddings=True)', "```", "",
            "It also loads as `SentenceTransformer(path, trust_remote_code=True)`.", ""])

    def merge_lora_and_restart(self) -> None:
        """Fold the LoRA adapters into the base weights and restart them (A random, B zero), as the paper does
        between stages: the next stage trains a fresh LoRA on the merged model. The folded factors are kept in
        `merged_lora` (concatenated along the rank over stages), saved with the adapter and folded in again on
        load, so a saved model is the base, the earlier stages' LoRA and the current one."""
        base = self.model.get_base_model()
        fold = {}
        with torch.no_grad():
            for name, module in base.named_modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    a = module.lora_A["default"].weight.detach().float().cpu().clone()  # reset below
                    b = module.lora_B["default"].weight.detach().float().cpu() * module.scaling["default"]
                    if not b.any():  # an untrained adapter (B starts at zero): nothing to fold
                        continue
                    fold[name] = (a, b)
                    module.reset_lora_parameters("default", True)
        _fold_lora(base, fold, lambda name: base.get_submodule(name).base_layer)
        for name, (a, b) in fold.items():
            old_a, old_b = self.merged_lora.get(name, (a[:0], b[:, :0]))
            self.merged_lora[name] = (torch.cat([old_a, a]), torch.cat([old_b, b], dim=1))

    # ----------------------------------------------------------------------------- modules
    def backbone(self) -> torch.nn.Module:
        """The transformer body (embeddings + layers + final norm), returning hidden states."""
        return self.model.get_base_model().get_decoder()

    @property
    def lm_head(self) -> torch.nn.Module:
        """The LM head (output embeddings) of the base model."""
        return self.model.get_base_model().get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.get_base_model().config.hidden_size

    @property
    def max_positions(self) -> int:
        """The longest row the base model takes (its ``max_position_embeddings``)."""
        return self.model.get_base_model().config.max_position_embeddings

    def hidden_states(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states `[B, L, D]` of the body for right-padded `[B, L]` inputs (no logits)."""
        out = self.backbone()(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              use_cache=False)
        return out.last_hidden_state

    # ----------------------------------------------------------------------------- encoding
    def tokenize(self, texts: Sequence[str], instruction: str | None | Sequence[str | None] = None,
                 max_length: int = 512) -> tokenization.TokenBatch:
        """Token ids ``[BOS] instruction text <mem_0..M-1> <pad>...`` (right padded), on CPU.

        `instruction` precedes every text, or is a list of one per text (None for none). Texts are truncated so
        the whole row fits `max_length` (at most the model's maximum position); an empty text gives a row
        without text tokens (for memory pooling). Returns a `TokenBatch` (a mapping too): int64
        ``input_ids`` / ``attention_mask`` `[B, L]` and int64 `[B]` ``seq_lens`` (real tokens),
        ``memory_start`` (first memory token) and ``text_start`` (first text token, after the BOS and
        instruction).
        """
        texts = list(texts)
        if instruction is None or isinstance(instruction, str):
            rows = tokenization.split_instruction(self.tokenizer, texts, instruction)
        else:
            rows = tokenization.split_instructions(self.tokenizer, texts, list(instruction))
        return self._pack(rows, max_length)

    def tokenize_ids(self, token_ids: Sequence[Sequence[int]], max_length: int = 512) -> tokenization.TokenBatch:
        """`tokenize` of texts given as token ids (no instruction): the rows read exactly these tokens, where a
        text decoded and tokenized again might not (a byte-level token cut from its character, say)."""
        return self._pack([([], list(ids)) for ids in token_ids], max_length)

    @property
    def start_token_id(self) -> int:
        """`llm2comp.tokenization.start_token_id` of the model's tokenizer."""
        return tokenization.start_token_id(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        """`llm2comp.tokenization.pad_token_id` of the model's tokenizer."""
        return tokenization.pad_token_id(self.tokenizer)

    def _pack(self, rows: list[tuple[list[int], list[int]]], max_length: int) -> tokenization.TokenBatch:
        return tokenization.pack(rows, bos=self.bos_ids, memory_token_ids=self.memory_token_ids,
                                 pad_token_id=self.pad_token_id, max_length=min(max_length, self.max_positions))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seq_lens: torch.Tensor,
                memory_start: torch.Tensor, text_start: torch.Tensor | None = None,
                pooling: str | None = None) -> torch.Tensor:
        """Embeddings `[B, D]` (hidden dtype) of a `tokenize` batch.

        pooling: ``"memory"``, ``"mean"`` or ``"last"`` (`llm2comp.pooling`; `text_start` None: the text starts
        the row); default `self.pooling`.
        """
        pooling = check_pooling(pooling or self.pooling)  # before the (costly) forward
        hidden = self.hidden_states(input_ids=input_ids, attention_mask=attention_mask)
        text_start = text_start if text_start is not None else torch.zeros_like(memory_start)
        return pool(hidden, tokenization.TokenBatch(input_ids, attention_mask, seq_lens, memory_start, text_start),
                    pooling)

    def encode(self, sentences: str | Sequence[str], **kwargs):
        """Embed texts, sentence-transformers style: str -> `[D]`, list -> `[n, D]` (float32 unless quantized).

        Keyword arguments: prompt_name, prompt / instruction, batch_size (32), max_length (512), pooling,
        normalize_embeddings (False), truncate_dim (the model's), precision ("float32"), convert_to_numpy (True),
        convert_to_tensor (False), show_progress_bar (None: on for 5 batches or more), device (one, or a list to
        encode on several at once), pool (`start_multi_process_pool`), autocast (True). See
        `llm2comp.encode.encode_texts`.
        """
        check_encode_kwargs(kwargs)
        return encode_texts(self, sentences, **kwargs)

    def encode_query(self, sentences: str | Sequence[str], **kwargs):
        """`encode` with the model's ``"query"`` prompt, if it has one and no prompt is given."""
        return self.encode(sentences, **self._role_prompt(kwargs, ("query",)))

    def encode_document(self, sentences: str | Sequence[str], **kwargs):
        """`encode` with the model's first prompt of ``"document"``, ``"passage"``, ``"corpus"``, if it has one
        and no prompt is given."""
        return self.encode(sentences, **self._role_prompt(kwargs, ("document", "passage", "corpus")))

    def _role_prompt(self, kwargs: dict, names: tuple[str, ...]) -> dict:
        """`kwargs` with the role's prompt, or with none (not the model's default prompt) where it has no such
        prompt, as sentence-transformers' roles whose prompts default to ""."""
        if any(kwargs.get(k) is not None for k in ("prompt_name", "prompt", "instruction")):
            return kwargs
        name = next((n for n in names if n in self.prompts), None)
        return {**kwargs, "prompt": ""} if name is None else {**kwargs, "prompt_name": name}

    @staticmethod
    def similarity(a, b) -> torch.Tensor:
        """Cosine similarities float32 `[n, m]` of embeddings `a` `[n, D]` and `b` `[m, D]` (numpy or torch; a `[D]`
        one is one row), as sentence-transformers' ``model.similarity``."""
        return cosine_similarity(a, b)

    def start_multi_process_pool(self, devices: Sequence[str | torch.device] | None = None):
        """Worker processes that encode with copies of this model, one per device (default: every visible GPU),
        for ``encode(..., pool=pool)``; use it in a ``with`` block or `close()` it. See `llm2comp.multi_process`.
        """
        from .multi_process import EncodePool

        return EncodePool(self, devices)
