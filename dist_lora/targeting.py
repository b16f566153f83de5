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
- ``modules_to_save`` are never targeted.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

from torch import nn

from .config import ConfigError, LoraConfig
from .layers.embedding import embedding_kind
from .layers.linear import is_conv1d
from .naming import global_module_name

# PEFT's defaults for Hugging Face architectures (model.config.model_type).
HF_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}
MEGATRON_GPT_DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
ALL_LINEAR = "all-linear"


def parallel_linear_kind(module: nn.Module) -> Optional[str]:
    """'column' or 'row' for megatron's parallel linear layers (and subclasses), else None."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("megatron.core"):
            if cls.__name__ == "ColumnParallelLinear":
                return "column"
            if cls.__name__ == "RowParallelLinear":
                return "row"
    return None


def is_linear_layer(module: nn.Module) -> bool:
    """nn.Linear, Conv1D or a megatron parallel linear: what ``all-linear`` targets."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or parallel_linear_kind(module) is not None


def is_supported_layer(module: nn.Module) -> bool:
    """A layer LoRA can wrap: a linear one, or an embedding (targeted by name only, as in PEFT)."""
    return is_linear_layer(module) or embedding_kind(module) is not None


def _name_matches(spec: str | list[str], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{key}") for key in spec)


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
    ``allow_empty``: a pipeline stage may hold none of the targeted layers)."""
    spec = config.target_modules if config.target_modules is not None else default_targets(model)
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:  # PEFT compares case-insensitively
        spec = ALL_LINEAR
    layers = config.layers_to_transform
    layers = [layers] if isinstance(layers, int) else (layers or None)  # PEFT: [] means every layer
    heads = output_head_names(model) if spec == ALL_LINEAR else set()
    saved = config.modules_to_save or []
    found = []
    for name, module in _candidate_modules(model):
        # Match on the layout-independent name: a pipeline stage numbers its layers locally.
        key = global_module_name(model, name)
        if config.exclude_modules and _name_matches(config.exclude_modules, key):
            continue
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in saved):
            continue
        if spec == ALL_LINEAR:
            if name in heads or not is_linear_layer(module):
                continue
        elif not _name_matches(spec, key):
            continue
        if layers is not None and layer_index(key, config.layers_pattern) not in layers:
            continue
        if not is_supported_layer(module):
            raise ConfigError(
                f"target module {name!r} is a {type(module).__name__}; LoRA here supports nn.Linear, "
                "transformers Conv1D and megatron Column/RowParallelLinear (and embeddings: nn.Embedding, "
                "megatron VocabParallelEmbedding)."
            )
        found.append(name)
    if not found and not allow_empty:
        candidates = [n for n, m in _candidate_modules(model) if is_linear_layer(m)]
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise ConfigError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}"
            + _layer_filter_note(config, layers)
            + f". Linear modules it has: {shown or 'none'}."
        )
    return found


def _layer_filter_note(config: LoraConfig, layers: Optional[list[int]]) -> str:
    """The no-match error's note on the layer filter in effect, if any."""
    if layers is None:
        return ""
    pattern = f", layers_pattern={config.layers_pattern!r}" if config.layers_pattern else ""
    return f" (with layers_to_transform={config.layers_to_transform!r}{pattern})"


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, skipping the internals of already-wrapped LoRA layers."""
    from .layers.base import LoraLayer

    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, LoraLayer):
            skip.append(name + ".")
            yield name, module.base_layer
            continue
        yield name, module
