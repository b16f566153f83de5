"""Adding one adapter to a model: which modules, with which rank, alpha and init seed, wrapped
in which LoRA layer class (:meth:`dist_lora.model.LoraModel.add_adapter` runs these steps).

Everything a config decides is worked out here before a module changes (:func:`plan_targets`),
so a bad pattern or an unsupported feature fails with the model untouched.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, LoraConfig, refuse_unsupported_features
from .config_rules import import_megatron_core
from .layers import LoraEmbedding, LoraLayer, LoraLinear
from .layers import math as lm
from .layers.experts import share_expert_targets, tie_shared_expert_adapters
from .layers.kinds import embedding_kind, is_router, parallel_linear_kind
from .layers.parallel import LoraColumnParallelLinear, LoraRowParallelLinear
from .layers.parallel_embedding import LoraVocabParallelEmbedding
from .layers.parameter import LoraParameter
from .layers.router import LoraRouter
from .modules_to_save import ModulesToSaveWrapper
from .naming import global_module_name
from .parallel.setup import pipeline_group
from .targeting import find_parameter_targets, find_targets, is_saved_module

if TYPE_CHECKING:
    from .model import LoraModel


@dataclasses.dataclass(frozen=True)
class Target:
    """One module an adapter is added to, with everything derived from the config for it."""

    name: str  # in this model (this pipeline stage)
    global_name: str  # PP- and EP-independent (global layer and expert indices): what patterns and seeds see
    r: int
    alpha: float
    seed: int
    parameter: Optional[str] = None  # target_parameters: the parameter of module ``name`` adapted


def check_new_adapter(configs: dict[str, LoraConfig], adapter_name: str, config: LoraConfig) -> None:
    """Refuse adding adapter ``adapter_name`` with ``config`` next to the adapters ``configs``
    (a taken name, an unsupported feature, a second adapter that trains base biases)."""
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name.")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}.")
    refuse_unsupported(config)
    params = set(config.target_parameters or ())
    for name, other in configs.items():  # PEFT's rule: the nesting of parameter wrappers decides the saved keys
        if params and other.target_parameters and set(other.target_parameters) != params:
            raise ConfigError(
                f"adapters with target_parameters must all target the same parameters (as in PEFT): adapter "
                f"{adapter_name!r} has {sorted(params)}, adapter {name!r} has {sorted(other.target_parameters)}."
            )
    with_bias = [name for name, c in configs.items() if c.bias != "none"]
    if config.bias != "none" and with_bias:
        raise ConfigError(  # PEFT's rule and words: both adapters would train the same base biases
            f"LoraModel supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' for "
            f"all adapters (adapter {with_bias[0]!r} has bias={configs[with_bias[0]].bias!r}, "
            f"{adapter_name!r} asks for bias={config.bias!r})."
        )


def refuse_unsupported(config: LoraConfig) -> None:
    """A config changed after it was built may still ask for a feature dist_lora lacks; an init
    method PEFT knows but dist_lora cannot run yet is refused for a new adapter."""
    refuse_unsupported_features(config)
    if not config.init_kind.supported:
        raise NotImplementedError(
            f"init_lora_weights={config.init_lora_weights!r} is not yet supported by dist_lora; use True, False, "
            "'gaussian', 'pissa', 'pissa_niter_<N>', 'olora', 'eva', 'corda' or 'loftq'."
        )


def shared_seed(seed: Optional[int]) -> int:
    """The adapter-init seed: given, else ``torch.initial_seed()``; broadcast from rank 0 so
    that every rank (and so every replica of a replicated factor) initialises identically."""
    value = torch.initial_seed() if seed is None else seed
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = torch.tensor([value % (1 << 62)], dtype=torch.int64)
        dist.broadcast(box, src=0)
        value = int(box.item())
    return value


def plan_targets(model: nn.Module, adapter_name: str, config: LoraConfig, seed: int) -> list[Target]:
    """This stage's targets with their rank, alpha and init seed (patterns are applied
    here, so a bad one fails before any module is touched)."""
    modules = _find_targets_on_all_stages(model, config)
    parameters = find_parameter_targets(model, config)
    both = sorted(set(modules) & {name for name, _ in parameters})
    if both:
        raise ConfigError(
            f"modules {both} are targeted by target_modules={config.target_modules!r} and own parameters of "
            f"target_parameters={config.target_parameters!r}; a module cannot be targeted by both (as in PEFT)."
        )
    targets = []
    for name, parameter in [(n, None) for n in modules] + parameters:
        global_name = global_module_name(model, name)  # patterns and seeds see global layer indices
        key = global_name if parameter is None else f"{global_name}.{parameter}"  # PEFT: patterns see module.param
        targets.append(
            Target(
                name, key, config.rank_for(key), config.alpha_for(key), lm.init_seed(seed, key, adapter_name), parameter
            )
        )
    return share_expert_targets(targets, config, seed, adapter_name)  # runtime_config.expert_adapters="shared"


def _find_targets_on_all_stages(model: nn.Module, config: LoraConfig) -> list[str]:
    """This pipeline stage's targets. A stage may hold none of the targeted layers; only a
    config that matches nothing on every stage is an error (raised on every stage)."""
    stages = pipeline_group()
    if stages is None:
        return find_targets(model, config)
    targets = find_targets(model, config, allow_empty=True)
    count = torch.tensor([len(targets)])
    dist.all_reduce(count, group=stages)
    if count.item() == 0:
        find_targets(model, config)  # raises the no-match error naming the candidates
    return targets


def modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules ``config.modules_to_save`` names in ``model`` (already wrapped ones included,
    the copies inside a wrapper not); ConfigError if it names none."""
    if not config.modules_to_save:
        return []
    names = []
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            module_name = name
        elif is_saved_module(name, config.modules_to_save):
            if ".modules_to_save." in name or name.endswith(".original_module") or ".original_module." in name:
                continue
            module_name = name
        else:
            continue
        if is_saved_module(module_name, config.modules_to_save):
            names.append(module_name)
    if not names:
        raise ConfigError(f"modules_to_save={config.modules_to_save!r} matched no module.")
    return names


def make_lora_layer(module: nn.Module, config: LoraConfig) -> LoraLayer:
    """Wrap ``module`` in the LoRA layer class for its kind."""
    embedding = embedding_kind(module)
    if embedding == "embedding":
        return LoraEmbedding(module)
    if embedding == "vocab_parallel":
        return LoraVocabParallelEmbedding(module)
    if is_router(module):
        return LoraRouter(module)
    kind = parallel_linear_kind(module)
    if kind is None:
        return LoraLinear(module, fan_in_fan_out=config.fan_in_fan_out)
    core = import_megatron_core(config.megatron_core or "megatron.core")
    runtime = config.runtime_config
    comm = dict(tp_comm=runtime.tp_comm, keep_gathered_input=runtime.keep_gathered_input)
    if kind == "column" and isinstance(module, core.tensor_parallel.ColumnParallelLinear):
        return LoraColumnParallelLinear(module, **comm)
    if kind == "row" and isinstance(module, core.tensor_parallel.RowParallelLinear):
        return LoraRowParallelLinear(module, **comm)
    raise ConfigError(f"{type(module).__name__} is not a layer of {config.megatron_core}.")


def inject(
    host: "LoraModel", adapter_name: str, config: LoraConfig, targets: list[Target], low_cpu_mem_usage: bool,
    autocast: bool,
) -> None:
    """Add adapter ``adapter_name`` to every target of ``host``'s model, wrapping a module in its
    LoRA layer first; a base weight the init rewrites is kept for rollback
    (:meth:`LoraModel.keep_weight <dist_lora.model.LoraModel.keep_weight>`)."""
    device = "meta" if low_cpu_mem_usage else None
    rewrites = config.init_kind.rewrites_base and not low_cpu_mem_usage
    for target in targets:
        layer = host.model.get_submodule(target.name)
        if target.parameter is not None:
            layer = _parameter_layer(host, target, layer)
        elif not isinstance(layer, LoraLayer):
            layer = make_lora_layer(layer, config)
            host.replace_module(target.name, layer)
        if rewrites:
            host.keep_weight(layer.base_weight)  # undone exactly if a later layer fails
        layer.update_layer(
            adapter_name,
            r=target.r,
            lora_alpha=target.alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            lora_bias=config.lora_bias,
            use_dora=config.use_dora,
            seed=target.seed,
            loftq_config=config.loftq_config or None,
            device=device,
        )
        if not autocast:
            _cast_to_base_dtype(layer, adapter_name)
    tie_shared_expert_adapters(host.model, targets, config, adapter_name)


def _parameter_layer(host: "LoraModel", target: Target, module: nn.Module) -> LoraParameter:
    """The :class:`LoraParameter` of ``target.parameter`` at ``target.name``: the existing one
    (a later adapter), else a new one wrapping what is there (nested over the wrappers of the
    module's other parameters, as PEFT nests them)."""
    layer = module
    while isinstance(layer, LoraParameter):
        if layer.parameter_name == target.parameter:
            return layer
        layer = layer.base_layer
    layer = LoraParameter(module, target.parameter)
    host.replace_module(target.name, layer)
    return layer


def _cast_to_base_dtype(layer: LoraLayer, adapter_name: str) -> None:
    """``autocast_adapter_dtype=False``: the adapter's parameters in the base weight's dtype
    (PEFT's behaviour; a non-float, e.g. quantised, base keeps float32 adapters)."""
    dtype = layer.base_weight.dtype
    if not dtype.is_floating_point:
        return
    for store in (getattr(layer, name) for name in layer.adapter_layer_names):
        if adapter_name in store:
            store[adapter_name].to(dtype)  # in place: same Parameter objects, markers kept


def wrap_modules_to_save(host: "LoraModel", names: list[str], adapter_name: str) -> None:
    """Give adapter ``adapter_name`` its trainable copy of each module ``names`` lists, wrapping
    a module in a :class:`ModulesToSaveWrapper` first."""
    for name in names:
        module = host.model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            host.replace_module(name, module)
        module.add(adapter_name)


def trainable_biases(model: nn.Module, bias: str) -> list[torch.Tensor]:
    """The base biases a config's ``bias`` trains: "all" every bias of the model, "lora_only"
    those of the LoRA layers' base layers, "none" none."""
    if bias == "none":
        return []
    if bias == "all":
        return [p for n, p in model.named_parameters() if n.endswith("bias") and "lora_" not in n]
    return [  # "lora_only"
        m.base_layer.bias
        for m in model.modules()
        if isinstance(m, LoraLayer) and getattr(m.base_layer, "bias", None) is not None
    ]


def extend_unique(names: list[str], new: Iterable[str]) -> None:
    """Append the names of ``new`` that ``names`` lacks, in order."""
    names.extend(n for n in new if n not in names)
