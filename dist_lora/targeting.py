"""Which modules get adapters: PEFT's matching rules, plus defaults for megatron GPTModel.

Rules (as PEFT):
- ``target_modules`` a string: a regex that must ``fullmatch`` the module name;
  a list: a name matches if it equals an entry or ends with ``"." + entry``;
  ``"all-linear"``: every linear/Conv1D layer except the output head (never an embedding;
  embeddings are adapted only when named).
- ``exclude_modules``: the same rules, applied first.
- ``layers_to_transform``: only modules inside those layer indices, found as the first
  ``<layers_pattern>.<index>.`` in the name; with no pattern (None, "" or []) the first
  ``<parent>.<name>.<index>.``, so a layer list at the top of the model needs ``layers_pattern``.
- ``modules_to_save`` (a module named as PEFT does, :func:`is_saved_module`) and everything
  inside them are never targeted.

:func:`is_targeted` is this rule for one module name; :func:`find_targets` applies it to a
model's modules, the consolidation checks and the PEFT -> megatron loader to module names.
``target_parameters`` (PEFT's rule, :func:`find_parameter_targets`): a parameter ``<module>.<param>``
(its module's own parameters, ``recurse=False``) matches an entry equal to that full name or to
its end after a ``"."``; as in PEFT no other filter applies to it (exclude_modules,
layers_to_transform, layers_pattern act on target_modules only). With target_parameters and
``target_modules=None`` the model type's default target modules still apply (PEFT's rule; pass
``target_modules=[]`` for none); a model type without defaults then gets no module targets.

One deliberate difference from PEFT 0.21: a list entry equal to a whole module name still
obeys ``layers_to_transform`` here (PEFT lets it through; ``full_name_skips_layers`` asks
for PEFT's behaviour where a check predicts what PEFT will target).
"""

from __future__ import annotations

import re
from typing import Iterator, Optional, Union

from torch import nn

from .config import ConfigError, LoraConfig
from .expert_layout import parameter_geometry
from .layers.base import LoraLayer
from .layers.kinds import base_module, is_linear_layer, is_supported_layer, transformer_engine_linear
from .layers.parameter import LoraParameter, innermost_module
from .naming import global_module_name
from .parallel import zero

# PEFT's defaults for Hugging Face architectures (model.config.model_type).
HF_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}
MEGATRON_GPT_DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
ALL_LINEAR = "all-linear"

Spec = Union[str, list[str]]  # target_modules / exclude_modules: a regex or a list of names


def is_all_linear(spec: Optional[Spec]) -> bool:
    """Whether ``spec`` is ``"all-linear"`` (PEFT compares case-insensitively)."""
    return isinstance(spec, str) and spec.lower() == ALL_LINEAR


def name_matches(spec: Spec, name: str) -> bool:
    """PEFT's rule for target_modules / exclude_modules: a string is a regex that must match
    the whole name; a list matches a name equal to an entry or ending in ``"." + entry``."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{key}") for key in spec)


def transformed_layers(config: LoraConfig) -> Optional[list[int]]:
    """``layers_to_transform`` as a list, or None for every layer (an int is one layer; PEFT
    reads an empty list as every layer)."""
    layers = config.layers_to_transform
    return [layers] if isinstance(layers, int) else (layers or None)


def layer_index(name: str, layers_pattern: Optional[str | list[str]]) -> Optional[int]:
    """The first ``<pattern>.<index>.`` index in ``name`` (any ``<name>.<index>.`` without a pattern)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_saved_module(name: str, modules_to_save: Optional[list[str]]) -> bool:
    """PEFT's rule for modules_to_save: ``name`` equals an entry or ends in ``"." + entry``."""
    return any(name == m or name.endswith(f".{m}") for m in modules_to_save or ())


def in_saved_module(name: str, modules_to_save: Optional[list[str]]) -> bool:
    """``name`` is a saved module or lies inside one: never targeted (PEFT's
    ``(^|.*\.)entry($|\..*)``)."""
    parts = name.split(".")
    return any(is_saved_module(".".join(parts[:end]), modules_to_save) for end in range(1, len(parts) + 1))


def is_targeted(
    config: LoraConfig, name: str, spec: Spec, all_linear_takes: bool = True, full_name_skips_layers: bool = False
) -> bool:
    """PEFT's targeting rule for one module name (layout-independent: global layer indices):
    not excluded, not in modules_to_save, matched by ``spec`` (the config's target_modules or
    a default; ``"all-linear"`` matches where ``all_linear_takes``: a linear layer other than
    the output head), inside ``layers_to_transform``.

    ``full_name_skips_layers``: PEFT 0.21 quirk, a list entry equal to the whole name matches
    whatever ``layers_to_transform`` says (injection here applies the filter; a check of what
    PEFT itself will target in a file asks for PEFT's behaviour)."""
    if config.exclude_modules and name_matches(config.exclude_modules, name):
        return False
    if in_saved_module(name, config.modules_to_save):
        return False
    if is_all_linear(spec):
        if not all_linear_takes:
            return False
    elif not name_matches(spec, name):
        return False
    elif full_name_skips_layers and not isinstance(spec, str) and name in spec:
        return True
    layers = transformed_layers(config)
    return layers is None or layer_index(name, config.layers_pattern) in layers


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (excluded from ``all-linear``)."""
    heads = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if module is head or name.split(".")[-1] in ("output_layer", "lm_head"):
            heads.add(name)
    return heads


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type in HF_DEFAULT_TARGETS:
        return HF_DEFAULT_TARGETS[model_type]
    if type(model).__name__ == "GPTModel" and type(model).__module__.startswith("megatron.core"):
        return MEGATRON_GPT_DEFAULT_TARGETS
    raise ConfigError(
        f"target_modules is None and there are no default targets for {type(model).__name__} "
        f"(model_type={model_type!r}); known: {sorted(HF_DEFAULT_TARGETS)} and megatron GPTModel. "
        "Set target_modules explicitly."
    )


def find_targets(model: nn.Module, config: LoraConfig, allow_empty: bool = False) -> list[str]:
    """Names of the modules that get an adapter; raises if there are none (unless
    ``allow_empty``: a pipeline stage may hold none of the targeted layers, or the config has
    target_parameters and target_modules is [] or None without a default for the model)."""
    spec = config.target_modules
    if config.target_parameters and (spec == [] or (spec is None and not _has_default_targets(model))):
        return []  # only parameters are targeted (find_parameter_targets)
    spec = spec if spec is not None else default_targets(model)
    spec = ALL_LINEAR if is_all_linear(spec) else spec
    heads = output_head_names(model) if spec == ALL_LINEAR else set()
    found = []
    for name, module in _candidate_modules(model):
        # Match on the layout-independent name: a pipeline stage numbers its layers locally.
        key = global_module_name(model, name)
        te = transformer_engine_linear(module)
        if te and is_targeted(config, key, spec, all_linear_takes=name not in heads):
            raise ConfigError(
                f"target module {name!r} is TransformerEngine's {te}, which dist_lora does not support yet: build the "
                "model with dist_lora's local spec (dist_lora.bridges.build_megatron_gpt, or GPTModel with "
                "dist_lora.bridges.block_spec.gpt_local_block_spec)."
            )
        if not is_targeted(config, key, spec, all_linear_takes=name not in heads and is_linear_layer(module)):
            continue
        if not is_supported_layer(module):
            raise ConfigError(
                f"target module {name!r} is a {type(module).__name__}; LoRA here supports nn.Linear, "
                "transformers Conv1D and megatron Column/RowParallelLinear (and embeddings: nn.Embedding, "
                "megatron VocabParallelEmbedding; a megatron MoE TopKRouter)."
            )
        found.append(name)
    if not found and not allow_empty:
        candidates = [n for n, m in _candidate_modules(model) if is_linear_layer(m)]
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ConfigError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}"
            + _layer_filter_note(config, transformed_layers(config))
            + f". Linear modules it has: {shown or 'none'}."
        )
    return found


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module name, parameter name) of every parameter ``config.target_parameters`` names
    (module names layout-independent, as patterns and seeds see them; LoRA layers looked
    through), in module order and each module's parameter registration order (PEFT nests the
    wrappers of one module's parameters in that order). ConfigError if it names none, or a
    parameter that cannot be adapted (a megatron module's, one of a module targeted by
    target_modules or saved by modules_to_save)."""
    names = config.target_parameters
    if not names:
        return []
    found, candidates = [], []
    for name, module in _parameter_owners(model):
        key_module = global_module_name(model, name) if name else ""
        for pname, param in module.named_parameters(recurse=False):
            key = f"{key_module}.{pname}" if name else pname
            candidates.append(key)
            if not (key in names or any(key.endswith(f".{n}") for n in names)):
                continue
            _check_parameter_target(model, name, key, module, config)
            try:
                parameter_geometry(zero.full_shape(param))
            except ValueError as e:
                raise ConfigError(f"target_parameters matched {key!r}: {e}") from None
            found.append((name, pname))
    if not found:
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ConfigError(
            f"target_parameters={names!r} matched no parameter of {type(model).__name__} (an entry must equal a "
            f"full '<module>.<parameter>' name or its end after a '.'). Parameters it has: {shown or 'none'}."
        )
    return found


def _check_parameter_target(model: nn.Module, name: str, key: str, owner: nn.Module, config: LoraConfig) -> None:
    """ConfigError for a matched parameter dist_lora cannot adapt through target_parameters."""
    if type(owner).__module__.startswith("megatron"):
        raise ConfigError(
            f"target_parameters matched {key!r} of a megatron {type(owner).__name__}: target_parameters is for plain "
            "PyTorch / Hugging Face modules; on a megatron model target its layers with target_modules."
        )
    wrapper = model.get_submodule(name) if name else model
    if isinstance(wrapper, LoraLayer) and not isinstance(wrapper, LoraParameter):
        raise ConfigError(
            f"target_parameters matched {key!r}, but {name!r} is a LoRA layer of target_modules; a module cannot be "
            "targeted by both (as in PEFT). Remove it from one of them."
        )
    if not name:
        raise ConfigError(f"target_parameters matched {key!r} on the top-level module, which cannot be wrapped (as in PEFT).")
    if in_saved_module(name, config.modules_to_save):
        raise ConfigError(f"target_parameters matched {key!r}, inside modules_to_save={config.modules_to_save!r}.")


def _parameter_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module that may own parameters; a LoRA layer stands for the
    module it wraps (innermost, for nested parameter wrappers), its internals skipped."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, LoraLayer):
            skip.append(name + ".")
            module = innermost_module(module) if isinstance(module, LoraParameter) else module.base_layer
        yield name, module


def _has_default_targets(model: nn.Module) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    is_gpt = type(model).__name__ == "GPTModel" and type(model).__module__.startswith("megatron.core")
    return (isinstance(model_type, str) and model_type in HF_DEFAULT_TARGETS) or is_gpt


def _layer_filter_note(config: LoraConfig, layers: Optional[list[int]]) -> str:
    """The no-match error's note on the layer filter in effect, if any."""
    if layers is None:
        return ""
    pattern = f", layers_pattern={config.layers_pattern!r}" if config.layers_pattern else ""
    return f" (with layers_to_transform={config.layers_to_transform!r}{pattern})"


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, skipping the internals of already-wrapped LoRA layers."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        base = base_module(module)
        if base is not module:  # a LoRA layer: its base layer stands for it
            skip.append(name + ".")
        yield name, base
