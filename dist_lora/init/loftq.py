"""LoftQ for a model already quantised with bitsandbytes: :func:`replace_lora_weights_loftq`
(PEFT's ``replace_lora_weights_loftq``). The NF4 math and ``init_lora_weights="loftq"``'s
factors are in :mod:`dist_lora.factors.loftq`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import nn

from ..factors.loftq import bnb_functional, dequantized_4bit
from ..factors.weight_driven import weight_driven_factors
from ..layers.kinds import is_linear4bit


class _SafetensorsWeights:
    """Tensors by name from ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, path: str) -> None:
        import json

        self.files: dict[str, str] = {}
        if os.path.isdir(path):
            single = os.path.join(path, "model.safetensors")
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.isfile(single):
                path = single
            elif os.path.isfile(index):
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                self.files = {k: os.path.join(os.path.dirname(index), v) for k, v in weight_map.items()}
                self.single = None
                return
            else:
                raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model_path {path!r} is not a safetensors file or a directory holding one.")
        self.single = path

    def get(self, name: str) -> Optional[torch.Tensor]:
        from safetensors import safe_open

        path = self.single if self.single is not None else self.files.get(name)
        if path is None:
            return None
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(name) if name in f.keys() else None

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        """The stored shape (read from the header, no data loaded), or None if absent."""
        from safetensors import safe_open

        path = self.single if self.single is not None else self.files.get(name)
        if path is None:
            return None
        with safe_open(path, framework="pt", device="cpu") as f:
            return tuple(f.get_slice(name).get_shape()) if name in f.keys() else None


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
    weights = _SafetensorsWeights(os.fspath(model_path))
    prefix = getattr(peft_model.model, "base_model_prefix", None)
    layers = [(n, l) for n, l in peft_model.lora_layers() if is_linear4bit(l.base_layer)]
    if not layers:
        raise ValueError("replace_lora_weights_loftq: the model has no LoRA layer on a bitsandbytes Linear4bit.")
    keys = {}
    for name, layer in layers:  # everything checked before the first adapter changes
        if adapter_name not in layer.lora_A:
            raise ValueError(f"{name!r} has no adapter {adapter_name!r}.")
        candidates = [name + ".weight"]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :] + ".weight")
        key = next((k for k in candidates if weights.shape(k) is not None), None)
        if key is None:
            raise KeyError(f"{model_path!r} has no weight for {name!r} (looked for {candidates}).")
        base = layer.base_layer
        if weights.shape(key) != (base.out_features, base.in_features):
            raise ValueError(
                f"{name!r}: the original weight {key!r} has shape {weights.shape(key)}, the layer is "
                f"{base.out_features}x{base.in_features}; is model_path the model that was quantised?"
            )
        keys[name] = key
    for name, layer in layers:
        w = weights.get(keys[name])
        q = dequantized_4bit(layer.base_layer.weight)
        a, b, _ = weight_driven_factors(w.float() - q, layer.r[adapter_name], layer.scaling[adapter_name], "pissa")
        pa, pb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = (pa.detach().clone(), pb.detach().clone())
        pa.copy_(a.to(pa.dtype))
        pb.copy_(b.to(pb.dtype))
        if callback is not None and not callback(peft_model, name):
            pa.copy_(before[0])
            pb.copy_(before[1])
