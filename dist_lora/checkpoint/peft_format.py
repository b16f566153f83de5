"""PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Saved keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` /
``.lora_B.bias`` / ``.lora_magnitude_vector`` (DoRA's m, no ``.weight``; no adapter name), and ``base_model.model.<module>.<param>`` for
modules_to_save. Loading slices full tensors to this rank's shard, so a PEFT file loads
into a tensor-parallel model at any TP size.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ConfigError, LoraConfig
from ..deepspeed import zero
from ..io import atomic_path
from ..layers.base import LoraLayer

if TYPE_CHECKING:
    from ..model import LoraModel

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _layer_tensors(layer: LoraLayer, adapter: str) -> dict[str, torch.Tensor]:
    key_a, key_b = layer.factor_keys
    out = {key_a: layer.lora_A[adapter].weight, key_b: layer.lora_B[adapter].weight}
    if layer.lora_B[adapter].bias is not None:
        out["lora_B.bias"] = layer.lora_B[adapter].bias
    if adapter in layer.lora_magnitude_vector:  # DoRA's m: PEFT saves it without ".weight"
        out["lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].weight
    return out


def adapter_state_dict(model: "LoraModel", adapter: str, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """This rank's tensors of ``adapter`` under PEFT's saved names (detached, not copied;
    ``keep_vars``: the parameters themselves, as ZeRO-3 gathering needs them)."""
    from ..modules_to_save import ModulesToSaveWrapper

    if adapter not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter!r}; existing: {sorted(model.peft_config)}.")
    out = {}
    for name, layer in model.lora_layers():
        if adapter in layer.lora_A:
            for key, tensor in _layer_tensors(layer, adapter).items():
                out[f"{PREFIX}{name}.{key}"] = tensor if keep_vars else tensor.detach()
    for name, module in model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter].state_dict(keep_vars=keep_vars).items():
                out[f"{PREFIX}{name}.{key}"] = tensor
    return out


def _tensor_parallel(model: "LoraModel") -> bool:
    return any(getattr(layer, "tp_size", 1) > 1 for _, layer in model.lora_layers())


def save_adapter(
    model: "LoraModel", directory: str | os.PathLike, adapter: str, initial_dir: Optional[str | os.PathLike] = None
) -> None:
    """Write one adapter in PEFT's format. Refuses a tensor-parallel model: its tensors are
    shards; save a sharded checkpoint and consolidate it instead. With ``initial_dir`` (the
    adapter as saved before training) a PiSSA/OLoRA/CorDA adapter is written converted to
    plain LoRA (:mod:`.conversion`)."""
    if _tensor_parallel(model):
        raise ValueError(
            "save_pretrained writes one unsharded PEFT file, but this model is tensor parallel. "
            "Use dist_lora.checkpoint.sharded.save_sharded (per rank), then consolidate."
        )
    # ZeRO-3: the full tensors gathered from their partitions (every rank must call this)
    tensors = zero.full_tensors(adapter_state_dict(model, adapter, keep_vars=True))
    if any(t.is_meta for t in tensors.values()):
        raise ValueError(f"adapter {adapter!r} has uninitialised (meta) tensors; load weights before saving.")
    config = model.peft_config[adapter]
    if initial_dir is not None:
        from .conversion import converted_config, mutated_to_plain

        config = converted_config(config)
        initial = read_adapter_file(os.path.join(initial_dir, WEIGHTS_NAME))
        tensors = {k: v.contiguous() for k, v in mutated_to_plain(tensors, initial).items()}
    with zero.single_writer(model) as writes:  # ZeRO-3: rank 0 writes, every rank waits for it
        if writes:
            os.makedirs(directory, exist_ok=True)
            with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
                save_file(tensors, tmp, metadata={"format": "pt"})
            config_to_save = LoraConfig.from_dict({**config.to_dict(), "inference_mode": True})
            config_to_save.save_pretrained(directory)


def read_adapter_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors adapter file with a clear error for missing or corrupt files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is this a PEFT adapter directory (with {WEIGHTS_NAME})?")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it.") from None


def load_adapter(model: "LoraModel", directory: str | os.PathLike, adapter: str, is_trainable: bool = False) -> None:
    """Add adapter ``adapter`` from a PEFT directory. The model is unchanged if anything fails."""
    config = LoraConfig.from_pretrained(directory)
    config.inference_mode = not is_trainable
    tensors = read_adapter_file(os.path.join(directory, WEIGHTS_NAME))  # fail before touching the model
    model.add_adapter(adapter, config, low_cpu_mem_usage=True)
    try:
        _assign(model, tensors, adapter, source=str(directory))
    except Exception:
        model._discard_adapter(adapter)
        raise
    if not is_trainable:
        model._mark_trainable()


def load_adapter_weights(model: "LoraModel", directory: str | os.PathLike, adapter: str) -> None:
    _assign(model, read_adapter_file(os.path.join(directory, WEIGHTS_NAME)), adapter, source=str(directory))


def expected_keys(
    model: "LoraModel", adapter: str, module_key: Optional[Callable[[str], str]] = None
) -> dict[str, tuple[torch.nn.Module, str]]:
    """Saved key -> (module, parameter path) for every tensor ``adapter`` owns.

    ``module_key`` maps a module name to the name used in keys (default: PEFT's
    ``base_model.model.<name>``).
    """
    from ..modules_to_save import ModulesToSaveWrapper

    module_key = module_key or (lambda name: PREFIX + name)
    keys = {}
    for name, layer in model.lora_layers():
        if adapter in layer.lora_A:
            for key in _layer_tensors(layer, adapter):
                keys[f"{module_key(name)}.{key}"] = (layer, key)
    for name, module in model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for key in module.modules_to_save[adapter].state_dict():
                keys[f"{module_key(name)}.{key}"] = (module.modules_to_save[adapter], key)
    return keys


def resolve_parameter(module: torch.nn.Module, path: str, adapter: str) -> tuple[torch.nn.Module, str]:
    """(owning submodule, attribute name) of an ``expected_keys`` entry."""
    if isinstance(module, LoraLayer):
        if path == "lora_magnitude_vector":
            return module.lora_magnitude_vector[adapter], "weight"
        if path in module.factor_keys:  # an embedding's "lora_embedding_A" has no ".weight"
            return (module.lora_A, module.lora_B)[module.factor_keys.index(path)][adapter], "weight"
        factor, _, pname = path.partition(".")
        return getattr(module, factor)[adapter], pname
    sub_name, _, pname = path.rpartition(".")
    return (module.get_submodule(sub_name) if sub_name else module), pname


def set_tensor(sub: torch.nn.Module, pname: str, value: torch.Tensor) -> None:
    """Copy ``value`` into a parameter in place (so optimizers keep their references), or
    materialise a meta parameter, keeping its flags and sharding markers."""
    current = getattr(sub, pname)
    device = "cpu" if current.is_meta else current.device
    new = value.to(device=device, dtype=current.dtype)
    if current.is_meta and isinstance(current, torch.nn.Parameter):
        param = torch.nn.Parameter(new, requires_grad=current.requires_grad)
        param.__dict__.update(current.__dict__)
        setattr(sub, pname, param)
    else:
        with torch.no_grad():
            current.copy_(new)


@torch.no_grad()
def _assign(model: "LoraModel", tensors: dict[str, torch.Tensor], adapter: str, source: str) -> None:
    """Put full (unsharded) tensors into ``adapter``'s parameters, slicing to this rank's
    shard. Missing and unexpected keys are errors: PEFT only warns on the first and ignores
    the second, which loads a different model without a word."""
    keys = expected_keys(model, adapter)
    tensors = _without_saved_embeddings(model, tensors, source)
    missing = sorted(set(keys) - set(tensors))
    unexpected = sorted(set(tensors) - set(keys))
    if missing or unexpected:
        raise ConfigError(
            f"adapter weights in {source} do not match the model: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
            + " (wrong base model or target_modules?)."
        )
    updates = []
    for key, (module, path) in keys.items():
        value = tensors[key]
        if isinstance(module, LoraLayer):
            value = _shard_for(module, path, value, key)
        sub, pname = resolve_parameter(module, path, adapter)
        expected = tuple(getattr(sub, pname).shape)
        if tuple(value.shape) != expected:
            raise ConfigError(f"{key}: shape {tuple(value.shape)} in {source}, the model expects {expected}.")
        updates.append((sub, pname, value))
    for sub, pname, value in updates:  # all checks passed: now change the model
        set_tensor(sub, pname, value)


def _without_saved_embeddings(model: "LoraModel", tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``tensors`` without the base weights PEFT saves next to an adapted embedding
    (``save_embedding_layers``), each checked equal to the model's: loading an adapter never
    changes base weights (PEFT would overwrite them)."""
    from ..layers.embedding import SAVED_BASE_WEIGHT, LoraEmbedding

    out = dict(tensors)
    for name, layer in model.lora_layers():
        key = f"{PREFIX}{name}.{SAVED_BASE_WEIGHT}"
        if key not in out or not isinstance(layer, LoraEmbedding):
            continue
        saved, weight = out.pop(key), layer.base_weight
        if saved.shape != weight.shape or not torch.equal(saved.to(weight.dtype), weight.detach()):
            raise ConfigError(
                f"{key} in {source}: PEFT saved this embedding's base weight with the adapter "
                "(save_embedding_layers) and it differs from the model's; dist_lora loads adapters, not base "
                "weights: put that weight into the base model first (e.g. after resizing the vocabulary)."
            )
    return out


def _shard_for(layer: LoraLayer, path: str, value: torch.Tensor, key: str) -> torch.Tensor:
    """The part of a full factor that lives on this rank."""
    if path == layer.factor_keys[0]:
        if value.shape[1] != layer.in_features:
            raise ConfigError(f"{key}: in_features {value.shape[1]} in the file, the model has {layer.in_features}.")
        return layer.shard_a(value)
    if value.shape[0] != layer.out_features:
        raise ConfigError(f"{key}: out_features {value.shape[0]} in the file, the model has {layer.out_features}.")
    return layer.shard_b(value)
