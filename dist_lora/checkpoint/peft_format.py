"""PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Saved keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` /
``.lora_B.bias`` / ``.lora_magnitude_vector`` (DoRA's m, no ``.weight``; no adapter name), and ``base_model.model.<module>.<param>`` for
modules_to_save. Loading slices full tensors to this rank's shard, so a PEFT file loads
into a tensor-parallel model at any TP size.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ConfigError, LoraConfig
from ..parallel import zero
from ..io import atomic_path
from ..layers.base import LoraLayer
from ..layers.embedding import SAVED_BASE_WEIGHT, LoraEmbedding
from ..modules_to_save import ModulesToSaveWrapper
from ..naming import expert_parallel_rank_size, is_expert_container

if TYPE_CHECKING:
    from ..model import LoraModel

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# save_adapter's ``convert``: (config, full tensors) -> (config, tensors) to write
Convert = Callable[[LoraConfig, dict[str, torch.Tensor]], tuple[LoraConfig, dict[str, torch.Tensor]]]


class IncompatibleKeys(NamedTuple):
    """What PEFT's ``load_adapter`` / ``set_peft_model_state_dict`` return (torch's
    ``load_state_dict`` result). Always empty here: such keys are refused instead."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class PeftWrapper:
    """A model in PEFT's ``PeftModel`` role (:class:`dist_lora.model.LoraModel` derives from it):
    its adapter layers are in the model it wraps, ``self.model``, and saved under PEFT's
    ``base_model.model.`` prefix."""

    model: torch.nn.Module


def adapter_root(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(module holding the adapter layers, prefix of saved keys): a LoraModel's wrapped model
    under PEFT's ``base_model.model.``; a model with adapters injected into it
    (:func:`dist_lora.inject_adapter_in_model`) itself, with no prefix (as PEFT)."""
    return (model.model, PREFIX) if isinstance(model, PeftWrapper) else (model, "")


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
    configs = getattr(model, "peft_config", {})
    if adapter not in configs:
        raise ValueError(f"unknown adapter {adapter!r}; existing: {sorted(configs)}.")
    root, prefix = adapter_root(model)
    out = {}
    for name, module in root.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            for key, tensor in _layer_tensors(module, adapter).items():
                out[f"{prefix}{name}.{key}"] = tensor if keep_vars else tensor.detach()
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter].state_dict(keep_vars=keep_vars).items():
                out[f"{prefix}{name}.{key}"] = tensor
    return out


def _tensor_parallel(model: "LoraModel") -> bool:
    """Whether the adapter is split over ranks: tensor parallel, or MoE experts spread over EP ranks."""
    if any(getattr(layer, "tp_size", 1) > 1 for _, layer in model.lora_layers()):
        return True
    return any(is_expert_container(m) and expert_parallel_rank_size(m)[1] > 1 for m in model.modules())


def save_adapter(
    model: "LoraModel", directory: str | os.PathLike, adapter: str, convert: Optional[Convert] = None
) -> None:
    """Write one adapter in PEFT's format. Refuses a tensor-parallel model: its tensors are
    shards; save a sharded checkpoint and consolidate it instead. ``convert`` maps (config, full
    tensors) to what is written (a PiSSA/OLoRA/CorDA adapter released as plain LoRA:
    ``save_pretrained(path_initial_model_for_weight_conversion=...)``); it runs on every rank."""
    if _tensor_parallel(model):
        raise ValueError(
            "save_pretrained writes one unsharded PEFT file, but this model is tensor (or expert) parallel. "
            "Use dist_lora.checkpoint.sharded.save_sharded (per rank), then consolidate."
        )
    # ZeRO-3: the full tensors gathered from their partitions (every rank must call this)
    tensors = zero.full_tensors(adapter_state_dict(model, adapter, keep_vars=True))
    if any(t.is_meta for t in tensors.values()):
        raise ValueError(f"adapter {adapter!r} has uninitialised (meta) tensors; load weights before saving.")
    config = model.peft_config[adapter]
    if convert is not None:
        config, tensors = convert(config, tensors)
    with zero.single_writer(model) as writes:  # ZeRO-3: rank 0 writes, every rank waits for it
        if writes:
            write_adapter_dir(directory, tensors, config)


def write_adapter_dir(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: LoraConfig) -> None:
    """Write ``tensors`` (PEFT's saved names) and ``config`` (saved with inference_mode=True,
    ``config`` itself unchanged) as a PEFT adapter directory; the weights file atomically."""
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    LoraConfig.from_dict({**config.to_dict(), "inference_mode": True}).save_pretrained(directory)


def read_adapter_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors adapter file with a clear error for missing or corrupt files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is this a PEFT adapter directory (with {WEIGHTS_NAME})?")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it.") from None


def load_adapter(
    model: "LoraModel",
    directory: str | os.PathLike,
    adapter: str,
    is_trainable: bool = False,
    config: Optional[LoraConfig] = None,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Add adapter ``adapter`` from a PEFT directory, as PEFT's ``PeftModel.load_adapter``:
    frozen unless ``is_trainable``, and then the model is put in eval mode (dropout off).
    ``config`` (copied) replaces the directory's adapter_config.json.

    An adapter whose init rewrote the base weight (PiSSA, OLoRA, LoftQ) is initialised again
    first, as PEFT does, so that the base becomes what it was trained on; the file's factors
    then replace the fresh ones. CorDA needs its data pass for that (``preprocess_corda`` on
    this model, as in PEFT); without it the adapter is refused with how to save a loadable one.
    Other adapters are created empty and filled from the file whatever ``low_cpu_mem_usage``
    says (same result; PEFT's default only spends time on an init the file overwrites).

    Everything is read and checked before the model changes, and if anything fails the model is
    handed back exactly as it was. Returns PEFT's result, always empty (see :func:`assign_tensors`)."""
    del low_cpu_mem_usage  # see above
    directory = os.fspath(directory)
    config = config_for_load(directory, config, is_trainable)
    check_reproducible(model, config, directory)
    tensors = read_adapter_file(os.path.join(directory, WEIGHTS_NAME))  # fail before touching the model
    with model.rollback_on_error():
        redo_init = config.init_kind.rewrites_base
        model.add_adapter(adapter, config, low_cpu_mem_usage=not redo_init, autocast_adapter_dtype=autocast_adapter_dtype)
        assign_tensors(model, tensors, adapter, source=os.path.join(directory, WEIGHTS_NAME))
    if not is_trainable:
        model.eval()
    return IncompatibleKeys([], [])


def config_for_load(directory: str, config: Optional[LoraConfig], is_trainable: bool) -> LoraConfig:
    """The config an adapter is loaded with: ``config`` (a copy) or the directory's, with
    ``inference_mode`` set from ``is_trainable`` as PEFT does."""
    if config is None:
        config = LoraConfig.from_pretrained(directory)
    elif isinstance(config, LoraConfig):
        config = copy.deepcopy(config)  # never mutate the caller's config (PEFT does)
    else:
        raise ConfigError(
            f"config must be a dist_lora LoraConfig, got {type(config).__name__}; build one with "
            "dist_lora.LoraConfig(...) or LoraConfig.from_pretrained(adapter_dir)."
        )
    config.inference_mode = not is_trainable
    return config


def check_reproducible(model: torch.nn.Module, config: LoraConfig, directory: str) -> None:
    """Refuse (or warn about) an adapter whose base rewrite cannot be redone here.

    The files of an unconverted PiSSA / OLoRA / CorDA / LoftQ adapter hold the trained factors
    only; they compute the trained function on the rewritten base, which loading recomputes
    from the original weight. CorDA's rewrite needs the covariance data of ``preprocess_corda``:
    refused unless this model holds it (PEFT refuses too). ``pissa_niter_<N>`` recomputes a
    randomised SVD: warned."""
    init = config.init_lora_weights
    source = os.path.join(directory, "adapter_config.json")
    root, _ = adapter_root(model)
    if init == "corda" and not any(hasattr(m, "corda_eigens") for m in root.modules()):
        raise ConfigError(
            f"{source}: this adapter was trained with init_lora_weights='corda', which rewrote the base weights "
            "with a data-dependent residual; the files hold only the trained factors, which compute something "
            "else on the original model. Save a loadable adapter instead: "
            "save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved before training>) "
            "(a plain LoRA adapter of rank 2r for the original model; for a sharded run `dist-lora consolidate "
            "CKPT OUT --initial INITIAL_CKPT`). Or run dist_lora.init.preprocess_corda(model, config, run_model) "
            "on this model with the training data first, as PEFT requires."
        )
    if config.init_kind.niter is not None:
        warnings.warn(
            f"{source}: init_lora_weights={init!r} is redone to rewrite the base weight; on a layer that is not "
            "tensor parallel its randomised SVD reproduces the trained model's base only with the seed and adapter "
            "name of the training run (LoraModel.from_pretrained(..., seed=...)). For an exact release save it with "
            "save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter saved before training>)."
        )


def load_adapter_weights(model: "LoraModel", directory: str | os.PathLike, adapter: str) -> None:
    path = os.path.join(directory, WEIGHTS_NAME)
    assign_tensors(model, read_adapter_file(path), adapter, source=path)


def expected_keys(
    model: "LoraModel", adapter: str, module_key: Optional[Callable[[str], str]] = None
) -> dict[str, tuple[torch.nn.Module, str]]:
    """Saved key -> (module, parameter path) for every tensor ``adapter`` owns.

    ``module_key`` maps a module name to the name used in keys (default: PEFT's
    ``base_model.model.<name>``; no prefix for a model with injected adapters).
    """
    root, prefix = adapter_root(model)
    module_key = module_key or (lambda name: prefix + name)
    keys = {}
    for name, module in root.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            for key in _layer_tensors(module, adapter):
                keys[f"{module_key(name)}.{key}"] = (module, key)
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
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
def assign_tensors(model: "LoraModel", tensors: dict[str, torch.Tensor], adapter: str, source: str) -> None:
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
            value = _shard_for(module, path, value, f"{source}: {key}", adapter)
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
    out = dict(tensors)
    root, prefix = adapter_root(model)
    for name, layer in root.named_modules():
        key = f"{prefix}{name}.{SAVED_BASE_WEIGHT}"
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


def _shard_for(layer: LoraLayer, path: str, value: torch.Tensor, key: str, adapter: str) -> torch.Tensor:
    """The part of a full factor that lives on this rank."""
    if path == layer.factor_keys[0]:
        layer.check_saved_factor(0, value, key, adapter)
        return layer.shard_a(value)
    layer.check_saved_factor(1, value, key, adapter)
    return layer.shard_b(value)
