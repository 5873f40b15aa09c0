"""`merged_weights`: the adapted layers of a peft model run on merged weights while encoding on the CPU.

An unmerged LoRA layer computes ``x W^T + s (x A^T) B^T``: three matmuls, then a scaling and a sum over the
`[tokens, out]` output, in every adapted projection of every layer; peft's trainable-token embedding (the memory
rows) copies the whole embedding matrix at every forward to put its rows in. Within `merged_weights`, a LoRA layer is
one matmul on ``W + s B A`` and the embedding looks up a merged matrix, both made once and cached.

The model is never changed: the merged weights are copies (``W + s B A - s B A`` is not ``W`` in floating point),
so training and saving see exactly what they saw. LoRA layers are merged in float32 or wider only, so that the
embeddings differ from the unmerged ones by float32 rounding (products summed in another order, as with another
batch size); the embedding's rows are put in exactly. A copy is kept per layer, as much memory again as the adapted
weights, and made again when one of the layer's tensors changes: a new tensor, or its version counter bumped by an
in-place update (an optimizer step, ``load_state_dict``; not a change made through ``.data``, which autograd does not
see either). CPU only: on a GPU that memory is better left to the batch. Weights in shared memory (a CPU
`EncodePool`'s) are not merged: another process may change them without their version changing here.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator

import torch

__all__ = ["merged_weights"]

_MERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (key, merged weight)


def _cached(layer: torch.nn.Module, tensors: list[torch.Tensor], extra: tuple, merge: Callable[[], torch.Tensor]
            ) -> torch.Tensor:
    """`merge()` of `layer`, from the cache while `tensors` (the same ones, unchanged in place) and `extra` are."""
    key = (extra, tuple((t.device, t.data_ptr(), t._version, t.dtype) for t in tensors))
    cached = _MERGED.get(layer)
    if cached is None or cached[0] != key:
        _MERGED.pop(layer, None)  # the stale copy goes before the new one is made
        with torch.no_grad():
            cached = _MERGED[layer] = (key, merge())
    return cached[1]


def _lora_linear(layer, adapters: list[str], x: torch.Tensor) -> torch.Tensor:
    """`layer`'s forward with `adapters` on: ``linear(x, W + sum of s B A, bias)``."""
    weight = layer.base_layer.weight

    def merge():
        merged = weight.detach().clone()
        for a in adapters:
            merged += layer.get_delta_weight(a)
        return merged
    tensors = [weight, *(m[a].weight for a in adapters for m in (layer.lora_A, layer.lora_B))]
    merged = _cached(layer, tensors, (tuple(adapters), tuple(layer.scaling[a] for a in adapters)), merge)
    return torch.nn.functional.linear(x, merged, layer.base_layer.bias)


def _token_weights(layer, adapters: list[str]) -> torch.Tensor:
    """peft's ``get_merged_weights(adapters)`` of a trainable-token layer (the embedding with the trainable rows put
    in), cached."""
    tensors = [layer.base_layer.weight, *(layer.trainable_tokens_delta[a] for a in adapters)]
    indices = tuple(tuple(layer.token_indices[a]) for a in adapters)
    return _cached(layer, tensors, (tuple(adapters), indices),
                   lambda: type(layer).get_merged_weights(layer, adapters))


def _on_cpu(layer: torch.nn.Module) -> bool:
    weight = getattr(layer.base_layer, "weight", None)
    return weight is not None and weight.device.type == "cpu" and not weight.is_shared()


def _lora_adapters(layer) -> list[str]:
    """The active adapters of a LoRA layer that merge into its weight ([] where peft's forward must run: adapters
    disabled or merged in place, another base layer, a LoRA variant such as DoRA, or a weight narrower than float32,
    in which ``W + s B A`` would round away much of an update small next to ``W``)."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if (layer.disable_adapters or layer.merged or not isinstance(layer.base_layer, torch.nn.Linear)
            or layer.base_layer.weight.dtype not in (torch.float32, torch.float64)
            or any(a in layer.lora_variant for a in adapters)):
        return []
    return adapters


@contextlib.contextmanager
def merged_weights(model: torch.nn.Module, *, keep: bool = True) -> Iterator[None]:
    """Within the block, the LoRA and trainable-token layers of `model` on the CPU run on merged weights (see the
    module). For inference in eval mode (LoRA dropout off); `keep` False drops the merged copies on exit (a model in
    training changes its weights at every step)."""
    from peft.tuners.lora import Linear as LoraLinear  # here: `llm2comp.export.onnx_runtime` imports no peft
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = []
    try:
        for layer in model.modules():
            if isinstance(layer, (LoraLinear, TrainableTokensLayer)) and _on_cpu(layer):
                layers.append(layer)
                # instance attributes shadow the class's methods; removed on exit
                if isinstance(layer, TrainableTokensLayer):  # peft's forward takes its weight from this method
                    layer.get_merged_weights = functools.partial(_token_weights, layer)
                elif adapters := _lora_adapters(layer):
                    layer.forward = functools.partial(_lora_linear, layer, adapters)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("get_merged_weights", None)
            if not keep:
                _MERGED.pop(layer, None)
