"""PEFT's status reports: ``get_layer_status`` / ``get_model_status`` and their dataclasses
(PEFT's ``TunerLayerStatus`` / ``TunerModelStatus``, field for field).

They take a LoraModel or a model with adapters injected into it; under tensor/pipeline
parallelism each rank reports its own part of the model (its shards, its stage's layers).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator, Literal, Optional, Union

import torch
from torch import nn

from .checkpoint.peft_format import PeftWrapper
from .layers.base import LoraLayer
from .modules_to_save import ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclasses.dataclass
class LayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclasses.dataclass
class ModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[Optional[str], Irregular]


def _adapter_modules(model: nn.Module) -> Iterator[tuple[str, Union[LoraLayer, ModulesToSaveWrapper]]]:
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            yield name, module


def _per_adapter(module: Union[LoraLayer, ModulesToSaveWrapper]) -> dict[str, list[torch.Tensor]]:
    """Adapter name -> its parameters in ``module``."""
    stores = module.adapter_layer_names if isinstance(module, LoraLayer) else ("modules_to_save",)
    out: dict[str, list[torch.Tensor]] = {}
    for store in stores:
        for adapter, sub in getattr(module, store).items():
            out.setdefault(adapter, []).extend([sub] if isinstance(sub, nn.Parameter) else sub.parameters())
    return out


def _all_or_irregular(values: list) -> Union[bool, Irregular]:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _layer_status(name: str, module: Union[LoraLayer, ModulesToSaveWrapper]) -> LayerStatus:
    params = _per_adapter(module)
    if isinstance(module, LoraLayer):
        enabled, active, merged = not module.disable_adapters, module.active_adapters, list(module.merged_adapters)
        backend = "bnb 4bit" if getattr(module, "quantized", False) else None
    else:
        enabled, merged, backend = not module.disabled, [], None
        active = [] if module.active_adapter is None else [module.active_adapter]
    return LayerStatus(
        name=name,
        module_type=module._get_name(),
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={a: _all_or_irregular([p.requires_grad for p in ps]) for a, ps in params.items()},
        available_adapters=sorted(params),
        devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()},
        quantization_backend=backend,
    )


def get_layer_status(model: nn.Module) -> list[LayerStatus]:
    """Each adapter layer's (and modules_to_save wrapper's) state, as PEFT's ``get_layer_status``."""
    status = [_layer_status(name, module) for name, module in _adapter_modules(model)]
    if not status:
        raise ValueError("no adapter layers found in the model: add an adapter first (get_lora_model / add_adapter).")
    return status


def adapters_enabled(model: nn.Module) -> Union[bool, Irregular]:
    """True if every adapter layer is enabled, False if none is, else "irregular"."""
    flags = {
        not (m.disable_adapters if isinstance(m, LoraLayer) else m.disabled) for _, m in _adapter_modules(model)
    }
    return flags.pop() if len(flags) == 1 else ("irregular" if flags else True)


def _merged(layers: list[LayerStatus]) -> Union[list[str], Irregular]:
    """Adapters merged in every layer holding them, or "irregular" (PEFT's rule)."""
    merged = set().union(*(s.merged_adapters for s in layers))
    for status in layers:
        if (set(status.available_adapters) - set(status.merged_adapters)) & merged:
            return "irregular"
    return sorted(merged)


def _uniform(values: set) -> Any:
    return values.pop() if len(values) == 1 else "irregular"


def get_model_status(model: nn.Module) -> ModelStatus:
    """The adapters' state summed up over the layers, as PEFT's ``get_model_status``."""
    layers = get_layer_status(model)
    if isinstance(model, PeftWrapper):  # a LoraModel: PEFT reports the wrapped model's type
        base_type, adapter_type = type(model.model).__name__, type(model).__name__
        peft_types = {name: "LORA" for name in model.peft_config}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        hf = any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)
        base_type, adapter_type, peft_types = (type(model).__name__ if hf else "other"), "None", {}
        params = list(model.parameters())
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    requires_grad, devices = collections.defaultdict(list), collections.defaultdict(set)
    for status in layers:
        for adapter, flag in status.requires_grad.items():
            requires_grad[adapter].append(flag)
        for adapter, kinds in status.devices.items():
            devices[adapter].update(kinds)
    active = {tuple(s.active_adapters) for s in layers}
    return ModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_uniform({s.enabled for s in layers}),
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=_merged(layers),
        requires_grad={a: _all_or_irregular(flags) for a, flags in requires_grad.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={a: sorted(kinds) for a, kinds in devices.items()},
        quantization_backend=_uniform({s.quantization_backend for s in layers}),
    )

