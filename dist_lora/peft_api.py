"""PEFT's module-level functions ``inject_adapter_in_model``, ``get_peft_model_state_dict`` and
``set_peft_model_state_dict`` (``get_layer_status`` / ``get_model_status`` are in
:mod:`dist_lora.peft_status`; ``dist_lora`` exports all five).

They take a LoraModel or a model with adapters injected into it. Under tensor/pipeline
parallelism each rank handles its own part of the model (its shards, its stage's layers).
PeftModel's methods are on :class:`dist_lora.model.LoraModel` (:mod:`dist_lora.peft_methods`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import nn

from .checkpoint.peft_format import PREFIX, IncompatibleKeys, adapter_root, adapter_state_dict, assign_tensors
from .config import ConfigError, LoraConfig
from .model import LoraModel

__all__ = ["get_peft_model_state_dict", "inject_adapter_in_model", "set_peft_model_state_dict"]


def inject_adapter_in_model(
    peft_config: LoraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` into ``model`` in place and return ``model`` (not a
    LoraModel), as PEFT's ``inject_adapter_in_model``: the base is frozen, the adapter is the
    active one, and ``model.peft_config`` maps adapter names to configs. With ``state_dict``
    the targets are the modules its LoRA keys name (its values are not used) instead of the
    config's ``target_modules``. Load weights with :func:`set_peft_model_state_dict`."""
    configs = dict(getattr(model, "peft_config", None) or {})
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists in this model; choose another name.")
    if state_dict is not None:
        if peft_config.target_parameters:  # PEFT refuses it too: the nesting of parameter wrappers is not in the keys
            raise ConfigError(
                "inject_adapter_in_model: a state_dict cannot choose the targets of a config with target_parameters; "
                "inject without state_dict, then load it with set_peft_model_state_dict."
            )
        peft_config = _targets_from_state_dict(peft_config, state_dict)
    lora_model = LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    model.peft_config = {**configs, **lora_model.peft_config}
    return model


def _targets_from_state_dict(config: LoraConfig, state_dict: dict[str, torch.Tensor]) -> LoraConfig:
    suffixes = (".lora_A.weight", ".lora_B.weight")
    names = sorted({k.removeprefix(PREFIX)[: -len(s)] for k in state_dict for s in suffixes if k.endswith(s)})
    if not names:
        raise ConfigError("inject_adapter_in_model: the state_dict has no '<module>.lora_A.weight' keys to target.")
    return dataclasses.replace(
        config, target_modules=names, exclude_modules=None, layers_to_transform=None, layers_pattern=None
    )


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: Union[bool, str] = "auto",
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors (this rank's) under PEFT's saved names, without the
    adapter name: ``base_model.model.<module>.lora_A.weight`` for a LoraModel, ``<module>...``
    for a model with injected adapters (PEFT's ``get_peft_model_state_dict``). No base weights
    are ever included, so ``save_embedding_layers=True`` is refused."""
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if state_dict is not None:
        raise NotImplementedError(
            "get_peft_model_state_dict(state_dict=...) is not supported: pass the model itself, its adapter "
            "tensors are read from it."
        )
    if save_embedding_layers is True:
        raise NotImplementedError(
            "get_peft_model_state_dict(save_embedding_layers=True) is not supported: dist_lora saves adapter "
            "tensors only, never base embedding weights."
        )
    return adapter_state_dict(model, adapter_name)


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Put a PEFT adapter state dict (keys with or without ``base_model.model.``, no adapter
    name) into adapter ``adapter_name`` of ``model`` (a LoraModel or a model with injected
    adapters), sliced to this rank's shards (PEFT's ``set_peft_model_state_dict``). Unlike
    PEFT, missing, unexpected and mismatched tensors are refused before anything changes, so
    the result is always empty; meta (``low_cpu_mem_usage``) adapters are materialised."""
    del low_cpu_mem_usage  # meta parameters are materialised either way
    if ignore_mismatched_sizes:
        raise ConfigError(
            "set_peft_model_state_dict(ignore_mismatched_sizes=True) is not supported: a tensor whose shape does "
            "not fit the model is refused, not skipped (skipping it would load a different adapter)."
        )
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; existing: {sorted(configs)}.")
    _, prefix = adapter_root(model)
    tensors = {prefix + key.removeprefix(PREFIX): value for key, value in peft_model_state_dict.items()}
    assign_tensors(model, tensors, adapter_name, source="the state dict given to set_peft_model_state_dict")
    return IncompatibleKeys([], [])

