"""The value rules of LoraConfig's fields: each check raises a ConfigError naming the field.

:func:`check_lora_fields` runs them all on a LoraConfig (``LoraConfig.__post_init__`` calls it
after normalising the values); the others are the single rules some fields share with other
configs (:func:`check_bools`, :func:`check_layer_replication`, :func:`check_regex`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import TYPE_CHECKING, Any, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import LoraConfig

# PeftConfig.task_type values (peft.TaskType); PEFT refuses any other.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# `megatron_core` names a module that is imported to find the parallel layer classes.
# Importing an arbitrary name from a config file is code execution, so only these are allowed.
MEGATRON_CORE_ALLOWLIST = ("megatron.core",)


def check_bools(config: Any) -> None:
    """Every ``bool`` field of the dataclass ``config`` holds a real bool: text such as "false"
    would otherwise read as true."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.type == "bool" and not isinstance(value, bool):
            raise ConfigError(
                f"{type(config).__name__}.{f.name} must be True or False, got {value!r} "
                f"({type(value).__name__}); write a JSON/YAML boolean, not text."
            )


def check_lora_fields(config: "LoraConfig") -> None:
    """Every LoraConfig field value rule except the bool types and the unsupported features
    (``LoraConfig`` checks those first), in the order a user meets them."""
    _check_metadata(config)
    check_rank(config.r, "r")
    check_rank(config.qalora_group_size, "qalora_group_size")  # used by QALoRA only, as in PEFT
    for key, rank in config.rank_pattern.items():
        check_rank(rank, f"rank_pattern[{key!r}]")
    for key, alpha in [("lora_alpha", config.lora_alpha)] + [
        (f"alpha_pattern[{k!r}]", v) for k, v in config.alpha_pattern.items()
    ]:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ConfigError(f"{key} must be a finite number, got {alpha!r}.")
    if isinstance(config.lora_dropout, bool) or not isinstance(config.lora_dropout, (int, float)) or not (
        0.0 <= config.lora_dropout < 1.0
    ):
        raise ConfigError(f"lora_dropout must be in [0, 1), got {config.lora_dropout!r}.")
    if config.bias not in ("none", "all", "lora_only"):
        raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {config.bias!r}.")
    _check_module_names(config)
    _check_layers(config)
    _check_target_parameters(config)
    if config.lora_bias and config.use_dora:
        raise ConfigError("lora_bias=True is not supported together with use_dora=True.")
    if config.lora_bias and config.init_lora_weights not in (True, False):
        raise ConfigError(  # as PEFT, which would refuse to load such a config
            f"lora_bias=True is only supported with init_lora_weights=True or False, got {config.init_lora_weights!r}."
        )
    if config.megatron_core is not None and config.megatron_core not in MEGATRON_CORE_ALLOWLIST:
        raise ConfigError(
            f"megatron_core={config.megatron_core!r} is not an allowed module; allowed: "
            f"{list(MEGATRON_CORE_ALLOWLIST)}."
        )
    if config.init_lora_weights == "loftq" and not config.loftq_config:
        raise ConfigError("init_lora_weights='loftq' needs loftq_config (a LoftQConfig).")
    if config.layer_replication is not None:
        check_layer_replication(config.layer_replication)


def check_rank(rank: Any, name: str) -> None:
    """``rank`` is an integer >= 1 (``name`` is the field it came from)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {rank!r}.")


def as_list(value: Any) -> Any:
    """Sets and tuples become sorted/ordered lists; strings and None pass through."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def megatron_config_to_dict(value: Any) -> Optional[dict]:
    """A megatron TransformerConfig (or any dataclass) or dict -> a JSON-able plain dict."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if not isinstance(value, dict):
        raise ConfigError(
            f"megatron_config must be a dict or a megatron TransformerConfig, got {type(value).__name__}."
        )
    return {k: v for k, v in value.items() if _is_json_value(v)}


def _is_json_value(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return not (isinstance(value, float) and not math.isfinite(value))
    if isinstance(value, (list, tuple)):
        return all(_is_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False  # callables, dtypes, process groups: runtime objects, not configuration


def import_megatron_core(name: str):
    """Import the megatron core module named in a config, refusing anything off the allowlist."""
    if name not in MEGATRON_CORE_ALLOWLIST:
        raise ConfigError(
            f"megatron_core={name!r} is not an allowed module; allowed: {list(MEGATRON_CORE_ALLOWLIST)}. "
            "A config file must not be able to import arbitrary code."
        )
    return importlib.import_module(name)


def check_regex(pattern: str, what: str) -> None:
    """``pattern`` compiles as a regular expression (``what`` names it in the error)."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"{what} is not a valid regular expression ({e}); escape special characters with '\\'."
        ) from None


def _check_metadata(config: "LoraConfig") -> None:
    """PeftConfig's descriptive fields have PEFT's types (PEFT refuses an unknown task_type)."""
    if config.task_type is not None and config.task_type not in TASK_TYPES:
        raise ConfigError(f"task_type must be None or one of {list(TASK_TYPES)}, got {config.task_type!r}.")
    for name in ("base_model_name_or_path", "revision", "megatron_core"):
        if not isinstance(getattr(config, name), (str, type(None))):
            raise ConfigError(f"{name} must be a string or None, got {getattr(config, name)!r}.")
    if not isinstance(config.auto_mapping, (dict, type(None))):
        raise ConfigError(f"auto_mapping must be a dict or None, got {config.auto_mapping!r}.")


def _check_module_names(config: "LoraConfig") -> None:
    """target_modules / exclude_modules: a regex string or a list of names; modules_to_save: names."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name)
        if isinstance(value, str):
            check_regex(value, f"{name}={value!r} (a string is a regex that must match whole module names)")
        elif value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{name} must be a string (regex) or a list of strings, got {value!r}.")
    saved = config.modules_to_save
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(v, str) for v in saved)):
        raise ConfigError(f"modules_to_save must be a list of module names, e.g. ['lm_head'], got {saved!r}.")


def _check_target_parameters(config: "LoraConfig") -> None:
    """target_parameters: a list of parameter names (PEFT: ``<module>.<param>`` or a suffix of one,
    no regex); with it, what PEFT's ParamWrapper refuses is refused here too (lora_dropout,
    use_dora, lora_bias, fan_in_fan_out), and what dist_lora cannot do with it (inits that read
    or rewrite the base weight, layer_replication)."""
    value = config.target_parameters
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip(".") for v in value):
        raise ConfigError(
            f"target_parameters must be a list of parameter names (e.g. ['mlp.experts.gate_up_proj', "
            f"'mlp.experts.down_proj']; a name matches a full '<module>.<parameter>' name or its end after a '.', "
            f"no regex), got {value!r}."
        )
    if not value:
        return
    refused = [
        text for text, bad in (
            (f"lora_dropout={config.lora_dropout} (set 0: the dropout of a weight delta has no input to act on)",
             config.lora_dropout != 0),
            ("use_dora=True", config.use_dora),
            ("lora_bias=True", config.lora_bias),
            ("fan_in_fan_out=True", config.fan_in_fan_out),
            ("layer_replication", config.layer_replication is not None),
            (f"init_lora_weights={config.init_lora_weights!r} (use True, False or 'gaussian')",
             config.init_lora_weights not in (True, False, "gaussian")),
        ) if bad
    ]
    if refused:
        raise ConfigError(f"target_parameters={value!r} cannot be combined with {'; '.join(refused)}.")


def _check_layers(config: "LoraConfig") -> None:
    """layers_to_transform / layers_pattern, with PEFT's rules (an empty layers_pattern is unset)."""
    layers = config.layers_to_transform
    if layers is not None:
        listed = layers if isinstance(layers, list) else [layers]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in listed):
            raise ConfigError(f"layers_to_transform must be non-negative integers, got {layers!r}.")
        if isinstance(config.target_modules, str):
            raise ConfigError("layers_to_transform cannot be used when target_modules is a regex string.")
    pattern = config.layers_pattern
    if pattern is not None:
        if not isinstance(pattern, (str, list)) or not all(isinstance(p, str) for p in pattern):
            raise ConfigError(f"layers_pattern must be a string or a list of strings, got {pattern!r}.")
        if pattern and layers is None:
            raise ConfigError("layers_pattern is set but layers_to_transform is not; set both or neither.")
        if isinstance(config.target_modules, str):
            raise ConfigError("layers_pattern cannot be used when target_modules is a regex string.")
        for p in [pattern] if isinstance(pattern, str) else pattern:
            check_regex(p, f"layers_pattern entry {p!r}")


def check_layer_replication(ranges: Any) -> None:
    """``layer_replication``: a list of [start, end) integer pairs with 0 <= start < end (the
    model's layer count is checked where it is known, :func:`dist_lora.replication.expand_ranges`)."""
    if not isinstance(ranges, list):
        raise ConfigError(f"layer_replication must be a list of [start, end) pairs, got {ranges!r}.")
    for pair in ranges:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in pair
        ):
            raise ConfigError(f"layer_replication range {pair!r} must be a pair of integers [start, end).")
        start, end = pair
        if start < 0 or start >= end:
            raise ConfigError(f"layer_replication range {list(pair)!r} needs 0 <= start < end.")
