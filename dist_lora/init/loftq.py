"""LoftQ for a model already quantised with bitsandbytes: :func:`replace_lora_weights_loftq`
(PEFT's ``replace_lora_weights_loftq``). The NF4 math and ``init_lora_weights="loftq"``'s
factors are in :mod:`dist_lora.factors.loftq`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from ..bridges.checkpoint_reader import CheckpointReader
from ..factors.loftq import bnb_functional, dequantized_4bit
from ..factors.weight_driven import weight_driven_factors
from ..layers.kinds import is_linear4bit


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model,
    model_path: Optional[str] = None,
    adapter_name: str = "default",
    callback: Optional[Callable[[nn.Module, str], bool]] = None,
) -> None:
    """LoftQ (one step) for a LoraModel whose base layers are bitsandbytes ``Linear4bit``:
    for each such layer, A and B become the rank-r SVD of W - dequant(Q) (W read from the
    original safetensors weights at ``model_path``; s divided out as in :func:`dist_lora.factors.loftq.loftq_factors`).

    ``callback(model, module_name)`` is called after each replacement; returning False rolls
    that layer's adapter back. The quantised base weights are not changed.
    """
    bnb_functional()  # an ImportError naming the install command, before anything else
    if model_path is None:
        model_path = getattr(getattr(peft_model.model, "config", None), "_name_or_path", None)
        if not model_path or not os.path.exists(model_path):
            raise ValueError("replace_lora_weights_loftq needs model_path: the original model's safetensors file or directory.")
    with CheckpointReader(os.fspath(model_path)) as weights:
        _replace_with_loftq(peft_model, weights, adapter_name, callback)


def _replace_with_loftq(
    peft_model, weights: CheckpointReader, adapter_name: str, callback: Optional[Callable[[nn.Module, str], bool]]
) -> None:
    prefix = getattr(peft_model.model, "base_model_prefix", None)
    layers = [(n, l) for n, l in peft_model.lora_layers() if is_linear4bit(l.base_layer)]
    if not layers:
        raise ValueError("replace_lora_weights_loftq: the model has no LoRA layer on a bitsandbytes Linear4bit.")
    keys = {name: _original_weight_key(weights, name, layer, prefix, adapter_name) for name, layer in layers}
    for name, layer in layers:  # everything was checked before the first adapter changes
        w = weights.read(keys[name])
        q = dequantized_4bit(layer.base_layer.weight)
        a, b, _ = weight_driven_factors(w.float() - q, layer.r[adapter_name], layer.scaling[adapter_name], "pissa")
        pa, pb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = (pa.detach().clone(), pb.detach().clone())
        pa.copy_(a.to(pa.dtype))
        pb.copy_(b.to(pb.dtype))
        if callback is not None and not callback(peft_model, name):
            pa.copy_(before[0])
            pb.copy_(before[1])


def _original_weight_key(
    weights: CheckpointReader, name: str, layer: nn.Module, prefix: Optional[str], adapter_name: str
) -> str:
    """The checkpoint key of LoRA layer ``name``'s original weight (with or without the model's
    ``base_model_prefix``), checked to have the layer's shape."""
    if adapter_name not in layer.lora_A:
        raise ValueError(f"{name!r} has no adapter {adapter_name!r}.")
    candidates = [name + ".weight"]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :] + ".weight")
    key = next((k for k in candidates if k in weights), None)
    if key is None:
        raise KeyError(f"{weights.directory!r} has no weight for {name!r} (looked for {candidates}).")
    base = layer.base_layer
    if weights.shape(key) != (base.out_features, base.in_features):
        raise ValueError(
            f"{name!r}: the original weight {key!r} has shape {weights.shape(key)}, the layer is "
            f"{base.out_features}x{base.in_features}; is model_path the model that was quantised?"
        )
    return key
