"""LoraConfig: PEFT's fields, validated, with a PEFT-readable JSON round trip.

The dataclass mirrors PEFT 0.21's ``LoraConfig`` field for field, so every PEFT
adapter_config.json parses; the fields of features dist_lora lacks (``NOT_YET_SUPPORTED``) must
keep their defaults. Validation happens in ``__post_init__`` (a bad value is a ConfigError naming
the field) and never mutates what the caller passed in beyond normalising values (sets become
sorted lists, tuples lists, ``init_lora_weights`` PEFT's lower-case spelling, CorDA paths str)
so that ``to_dict`` is stable and diffable.

Its parts have their own modules and are importable from here too: the errors
(:mod:`dist_lora.errors`), the init kinds (:mod:`dist_lora.init_kind`), the field value rules
(:mod:`dist_lora.config_rules`) and the sub-configs (:mod:`dist_lora.sub_configs`). PEFT's
rank_pattern / alpha_pattern rule is here (:func:`match_pattern_key`, :func:`explicit_pattern`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .config_rules import as_list, check_bools, check_lora_fields, check_regex, megatron_config_to_dict
from .errors import ConfigError, DistLoraWarning
from .init_kind import InitKind, InitValue, canonical_init_lora_weights
from .io import atomic_write_text
from .sub_configs import CordaConfig, EvaConfig, LoftQConfig, LoraRuntimeConfig, sub_config

# The public API importable from here: LoraConfig and its parts (each defined in its own module).
__all__ = [
    "CONFIG_NAME", "NOT_YET_SUPPORTED", "ConfigError", "CordaConfig", "DistLoraWarning", "EvaConfig", "InitKind",
    "InitValue", "LoftQConfig", "LoraConfig", "LoraRuntimeConfig", "explicit_pattern", "match_pattern_key",
    "refuse_unsupported_features",
]

CONFIG_NAME = "adapter_config.json"

# The one list of PEFT 0.21 LoraConfig features dist_lora does not implement: field -> feature.
# These change what an adapter computes, so LoraConfig accepts each field (every PEFT
# adapter_config.json parses) but refuses a value other than the field's default when the
# config is built or loaded. The init methods only decide a new adapter's first weights: a
# config may name them (a trained adapter's file loads), get_lora_model refuses them.
NOT_YET_SUPPORTED: dict[str, str] = {
    "trainable_token_indices": "trainable tokens",
    "ensure_weight_tying": "tying the adapters of tied weights",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "lora_ga_config": "LoRA-GA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# adapter_config.json keys that describe the file, not the adapter: read and dropped.
_METADATA_KEYS = ("peft_version",)


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter; the fields and meanings are PEFT's ``LoraConfig``.

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``. Every field of
    PEFT 0.21's LoraConfig is here; those of features dist_lora lacks (``NOT_YET_SUPPORTED``)
    must keep their default.
    """

    task_type: Optional[str] = None
    peft_type: Optional[str] = "LORA"
    auto_mapping: Optional[dict] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: InitValue = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)
    alpha_pattern: Optional[dict] = field(default_factory=dict)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    loftq_config: Union[LoftQConfig, dict] = field(default_factory=dict)
    eva_config: Optional[EvaConfig] = None
    corda_config: Optional[CordaConfig] = None
    use_dora: bool = False
    layer_replication: Optional[list[tuple[int, int]]] = None
    runtime_config: LoraRuntimeConfig = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    # PEFT 0.21 fields of features not implemented here (see NOT_YET_SUPPORTED): defaults only.
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    lora_ga_config: Optional[Any] = None
    velora_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[Any] = None
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        if self.peft_type not in (None, "LORA"):
            raise ConfigError(f"peft_type must be 'LORA', got {self.peft_type!r}.")
        self.peft_type = "LORA"
        self.task_type = getattr(self.task_type, "value", self.task_type)  # a peft.TaskType -> its string
        self.target_modules = as_list(self.target_modules)
        self.exclude_modules = as_list(self.exclude_modules)
        self.modules_to_save = as_list(self.modules_to_save)
        self.layers_to_transform = as_list(self.layers_to_transform)
        self.layers_pattern = as_list(self.layers_pattern)
        self.target_parameters = as_list(self.target_parameters)
        self.rank_pattern = _pattern_dict(self.rank_pattern, "rank_pattern")
        self.alpha_pattern = _pattern_dict(self.alpha_pattern, "alpha_pattern")
        self.init_lora_weights = canonical_init_lora_weights(self.init_lora_weights)
        self.megatron_config = megatron_config_to_dict(self.megatron_config)
        if self.loftq_config:
            self.loftq_config = sub_config(LoftQConfig, self.loftq_config, "loftq_config")
        else:
            self.loftq_config = {}
        self.eva_config = sub_config(EvaConfig, self.eva_config, "eva_config")
        self.corda_config = sub_config(CordaConfig, self.corda_config, "corda_config")
        self.runtime_config = sub_config(LoraRuntimeConfig, self.runtime_config, "runtime_config") or LoraRuntimeConfig()
        if isinstance(self.layer_replication, (list, tuple)):
            self.layer_replication = [list(p) if isinstance(p, (list, tuple)) else p for p in self.layer_replication]
        self._validate()

    def _validate(self) -> None:
        check_bools(self)
        refuse_unsupported_features(self)
        check_lora_fields(self)

    @property
    def init_kind(self) -> InitKind:
        """What ``init_lora_weights`` does (:class:`InitKind`)."""
        return InitKind.of(self.init_lora_weights)

    # --- scaling -------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        key = match_pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        key = match_pattern_key(self.alpha_pattern, module_name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The JSON-able dict PEFT writes as adapter_config.json (runtime_config removed)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "runtime_config":
                continue
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return copy.deepcopy(out)  # the caller may modify the dict without changing the config

    @classmethod
    def from_dict(cls, data: dict) -> "LoraConfig":
        """Build from an adapter_config.json dict. Every PEFT 0.21 field is read (file metadata
        such as ``peft_version`` is dropped); a key this version does not know is accepted when
        it holds a neutral value and refused otherwise (silently dropping an unknown feature
        would load a different model)."""
        if not isinstance(data, dict):
            raise ConfigError(f"an adapter config must be a dict, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, refused = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key not in _METADATA_KEYS and value not in (None, False, {}, [], ""):
                refused.append(f"{key}={value!r}")
        if refused:
            raise ConfigError(
                f"adapter config uses PEFT features dist_lora does not support: {', '.join(refused)}."
            )
        return cls(**kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write adapter_config.json atomically into ``directory``; return its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is this a PEFT adapter directory?")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not a LoRA adapter config (a JSON {type(data).__name__}, not an object).")
        if data.get("peft_type") not in ("LORA", None):
            raise ConfigError(f"{path} is not a LoRA adapter config (peft_type={data.get('peft_type')!r}).")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None



def refuse_unsupported_features(config: "LoraConfig") -> None:
    """ConfigError naming every NOT_YET_SUPPORTED field ``config`` sets to a non-default value."""
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.name in NOT_YET_SUPPORTED}
    used = [name for name, default in defaults.items() if getattr(config, name) != default]
    if used:
        found = ", ".join(f"{name}={getattr(config, name)!r} ({NOT_YET_SUPPORTED[name]})" for name in used)
        fixes = ", ".join(f"{name}={defaults[name]!r}" for name in used)
        raise ConfigError(f"LoraConfig uses PEFT features dist_lora does not support: {found}. Use {fixes}.")


def _pattern_dict(value: Any, name: str) -> dict:
    """rank_pattern / alpha_pattern as a new dict, its keys checked as regexes with PEFT's rule."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{name} must be a dict {{module-name regex: value}}, e.g. {{'q_proj': 16}}, got "
            f"{type(value).__name__} {value!r}."
        )
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{name} keys must be strings (module-name regexes), got {key!r}.")
        check_regex(key, f"{name} key {key!r}")
        check_regex(rf"(.*\.)?({key})$", f"{name} key {key!r} in PEFT's rule (.*\\.)?(key)$")
    return dict(value)


def match_pattern_key(pattern: dict, module_name: str) -> Optional[str]:
    """PEFT's rule: key matches name if ``re.match(rf"(.*\\.)?({key})$", name)``; first match wins."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def explicit_pattern(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """rank_pattern / alpha_pattern entries giving each module in ``values`` its value: full
    module names for those that differ from ``default`` (regex-escaped if a plain name would
    match the wrong modules), checked with PEFT's rule (first ``(.*\\.)?(key)$`` match wins)."""

    def lookup(pattern: dict, name: str) -> Any:
        key = match_pattern_key(pattern, name)
        return default if key is None else pattern[key]

    for quote in (lambda name: name, re.escape):
        pattern = {quote(name): value for name, value in values.items() if value != default}
        if all(lookup(pattern, name) == value for name, value in values.items()):
            return pattern
    raise ConfigError(f"cannot express the per-module values {values} as a PEFT pattern.")  # pragma: no cover

