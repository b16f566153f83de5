"""PEFT's ``PeftModel``-level API: the methods PEFT users call on a model, and PEFT's
module-level functions.

:class:`PeftModelApi` is mixed into :class:`dist_lora.model.LoraModel` (which plays both of
PEFT's roles, ``PeftModel`` and its tuner): ``base_model`` / ``get_base_model`` /
``active_peft_config``, ``disable_adapter``, the status reports, the adapter state dict and
files (``save_pretrained``, ``load_adapter``, ``from_pretrained``).

The module-level functions are PEFT's ``inject_adapter_in_model``, ``get_peft_model_state_dict``,
``set_peft_model_state_dict``, ``get_layer_status`` and ``get_model_status``; they take a
LoraModel or a model with adapters injected into it. Under tensor/pipeline parallelism each
rank reports and handles its own part of the model (its shards, its stage's layers).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional, Union

import torch
from torch import nn

from .checkpoint.peft_format import PREFIX, IncompatibleKeys, adapter_root, adapter_state_dict, assign_tensors
from .config import ConfigError, LoraConfig
from .layers.base import LoraLayer
from .modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from .model import LoraModel

Irregular = Literal["irregular"]

__all__ = [
    "IncompatibleKeys",
    "LayerStatus",
    "ModelStatus",
    "PeftModelApi",
    "get_layer_status",
    "get_model_status",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_peft_model_state_dict",
]


# --- status reports (PEFT's TunerLayerStatus / TunerModelStatus, field for field) ------------


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
    from .model import LoraModel

    layers = get_layer_status(model)
    if isinstance(model, LoraModel):
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


# --- module-level functions ------------------------------------------------------------------


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
    from .model import LoraModel

    configs = dict(getattr(model, "peft_config", None) or {})
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists in this model; choose another name.")
    if state_dict is not None:
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


# --- the PeftModel-level methods of LoraModel --------------------------------------------


class PeftModelApi:
    """PEFT's ``PeftModel`` names on :class:`dist_lora.model.LoraModel` (mixed into it)."""

    @property
    def base_model(self) -> "LoraModel":
        """PEFT's ``PeftModel.base_model`` (its tuner): the LoraModel itself, so that
        ``peft_model.base_model.model`` is the wrapped model as in PEFT."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with its LoRA layers), as PEFT's ``get_base_model``."""
        return self.model

    @property
    def active_peft_config(self) -> LoraConfig:
        """The active adapter's config (one adapter must be active)."""
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"active_peft_config needs exactly one active adapter, {active} are active.")
        return self.peft_config[active[0]]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter(): ...`` runs the base model. On exit the adapters are
        enabled again unless they were all disabled before (PEFT's rule; a model with some
        layers enabled and some not, which PEFT warns about, comes back all enabled)."""
        was_enabled = adapters_enabled(self)
        if was_enabled == "irregular":
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is "
                "most likely unintentional. After exiting the disable_adapter context, all adapters will be enabled"
            )
        self.disable_adapter_layers()
        try:
            yield
        finally:
            if was_enabled is not False:
                self.enable_adapter_layers()

    def get_layer_status(self) -> list[LayerStatus]:
        """Each adapter layer's state (PEFT's ``get_layer_status``; this rank's layers)."""
        return get_layer_status(self)

    def get_model_status(self) -> ModelStatus:
        """The adapters' state over all layers (PEFT's ``get_model_status``; this rank's part)."""
        return get_model_status(self)

    # --- state dicts and files -----------------------------------------------------------

    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """This rank's adapter tensors under PEFT's saved names
        (``base_model.model.<module>.lora_A.weight``, no adapter name)."""
        return adapter_state_dict(self, adapter_name or self.active_adapters[0])

    def subtract_mutated_init(
        self, output_state_dict: dict[str, torch.Tensor], adapter_name: str, kwargs: Optional[dict] = None
    ) -> dict[str, torch.Tensor]:
        """Turn a trained PiSSA/OLoRA/CorDA adapter into a plain LoRA adapter for the ORIGINAL
        base (PEFT's ``LoraModel.subtract_mutated_init``): A' = [A; A0], B' = [B, -B0] (see
        :mod:`dist_lora.checkpoint.conversion`).

        ``output_state_dict`` holds the trained adapter (this rank's tensors under PEFT's saved
        names, as :meth:`adapter_state_dict` gives them); ``adapter_name`` is an adapter of this
        model holding the factors A0, B0 as they were at initialisation. Non-factor entries are
        dropped, as PEFT does. Works shard-wise under TP. Save the result with
        :func:`dist_lora.checkpoint.conversion.converted_config`."""
        from .checkpoint.conversion import mutated_to_plain

        del kwargs  # PEFT's ``state_dict`` override; this model's adapters are read directly
        return mutated_to_plain(output_state_dict, self.adapter_state_dict(adapter_name), keep_others=False)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        path_initial_model_for_weight_conversion: Optional[str | os.PathLike] = None,
    ) -> None:
        """Write PEFT's adapter files (``adapter_config.json`` + ``adapter_model.safetensors``);
        adapters other than ``default`` go into ``<dir>/<adapter_name>/`` as in PEFT.

        ``safe_serialization``: safetensors only; False (PEFT's pickled ``adapter_model.bin``)
        is refused. ``selected_adapters``: the adapters to save (default: all), all checked
        before anything is written. ``path_initial_model_for_weight_conversion``: the directory
        this PiSSA/OLoRA/CorDA adapter was saved to before training; the adapter is then written
        as a plain LoRA adapter of twice the rank that applies to the original base model
        (:mod:`dist_lora.checkpoint.conversion`)."""
        from .checkpoint.peft_format import save_adapter

        if safe_serialization is not True:
            raise ConfigError(
                f"save_pretrained(safe_serialization={safe_serialization!r}): dist_lora writes safetensors only "
                "(adapter_model.safetensors, which PEFT and transformers load), never pickled adapter_model.bin "
                "files. Leave safe_serialization at True."
            )
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"selected_adapters {unknown} are not adapters of this model; existing: {sorted(self.peft_config)}."
            )
        for name in names:
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter(self, directory, name, initial_dir=path_initial_model_for_weight_conversion)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> IncompatibleKeys:
        """Load a PEFT adapter directory as ``adapter_name`` (sliced to this rank's shards); it is
        not activated. As PEFT: ``is_trainable=False`` loads it frozen and puts the model in
        eval mode; a PiSSA/OLoRA/LoftQ adapter's init is redone first (the base weight becomes
        what it was trained on). Returns PEFT's ``(missing_keys, unexpected_keys)``, always
        empty (such files are refused). The model is unchanged if anything fails. See
        :func:`dist_lora.checkpoint.peft_format.load_adapter`."""
        from .checkpoint.peft_format import load_adapter

        return load_adapter(
            self, model_id, adapter_name, is_trainable=is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
        )
