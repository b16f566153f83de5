"""LoraConfig and its sub-configs: PEFT's fields, validated, with a PEFT-readable JSON round trip.

The dataclasses mirror PEFT 0.21's ``LoraConfig`` field for field, so every PEFT
adapter_config.json parses; the fields of features dist_lora lacks (``NOT_YET_SUPPORTED``) must
keep their defaults. Validation happens in ``__post_init__`` (a bad value is a ConfigError naming
the field) and never mutates what the caller passed in beyond normalising values (sets become
sorted lists, tuples lists, ``init_lora_weights`` PEFT's lower-case spelling, CorDA paths str)
so that ``to_dict`` is stable and diffable.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .io import atomic_write_text

CONFIG_NAME = "adapter_config.json"

InitValue = Union[bool, str]  # an init_lora_weights value (see InitKind for what it does)
# What each init_lora_weights method dist_lora runs does (see InitKind; "pissa_niter_<N>" is "pissa"):
#   method       (factors from, base weight after the adapter is created)
_INIT_KINDS: dict[InitValue, tuple[str, Optional[str]]] = {
    True: ("seed", None),  # A kaiming-uniform, B = 0 (PEFT's default)
    False: ("seed", None),  # A and B as nn.Linear's default init
    "gaussian": ("seed", None),
    "eva": ("data", None),  # the layers' inputs (initialize_lora_eva_weights, after injection)
    "olora": ("weight", "residual"),  # QR of W; W <- W - s·B·A
    "pissa": ("weight", "residual"),  # SVD of W; W <- W - s·B·A
    "corda": ("data", "residual"),  # SVD of W·C, C the inputs' covariance (preprocess_corda)
    "loftq": ("weight", "quantised"),  # W <- its NF4 quantisation Q, the factors absorb W - Q
}
NOT_YET_SUPPORTED_INIT: tuple[str, ...] = ("orthogonal", "mica", "lora_ga")
# init_lora_weights values understood by PEFT 0.21 (besides True / False and "pissa_niter_<N>").
INIT_METHODS = tuple(m for m in _INIT_KINDS if isinstance(m, str)) + NOT_YET_SUPPORTED_INIT
# PEFT's LoRA layer compares these with ``.lower()``; it reads every other init string as written.
_CASE_INSENSITIVE_INIT = ("gaussian", "olora", "mica")
_PISSA_NITER = re.compile(r"pissa_niter_(.*)")
# PeftConfig.task_type values (peft.TaskType); PEFT refuses any other.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# `megatron_core` names a module that is imported to find the parallel layer classes.
# Importing an arbitrary name from a config file is code execution, so only these are allowed.
MEGATRON_CORE_ALLOWLIST = ("megatron.core",)

# The one list of PEFT 0.21 LoraConfig features dist_lora does not implement: field -> feature.
# These change what an adapter computes, so LoraConfig accepts each field (every PEFT
# adapter_config.json parses) but refuses a value other than the field's default when the
# config is built or loaded. The init methods only decide a new adapter's first weights: a
# config may name them (a trained adapter's file loads), get_lora_model refuses them.
NOT_YET_SUPPORTED: dict[str, str] = {
    "target_parameters": "LoRA on nn.Parameter targets, coming with the MoE support",
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


class ConfigError(ValueError):
    """A LoraConfig value is out of range or inconsistent."""


class DistLoraWarning(UserWarning):
    """Something a user should act on (e.g. a checkpoint in an older format); the CLI prints
    each as one ``dist-lora CMD: warning: ...`` line."""


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


@dataclass
class LoraRuntimeConfig:
    """Runtime-only settings (never saved).

    ``ephemeral_gpu_offload`` is PEFT's field (accepted, no effect here). The others choose
    how tensor-parallel LoRA layers communicate (see :mod:`dist_lora.layers.parallel`):
    ``tp_comm`` "fused" (default: no collective beyond the frozen base's) or "reference"
    (PEFT's design, one r-sized collective per LoRA path); ``keep_gathered_input`` keeps the
    sequence-gathered input of column-parallel layers under sequence parallelism instead of
    re-gathering it in backward (more memory, one all-gather less per layer).
    """

    ephemeral_gpu_offload: bool = False
    tp_comm: str = "fused"
    keep_gathered_input: bool = False

    def __post_init__(self) -> None:
        check_bools(self)
        if self.tp_comm not in ("fused", "reference"):
            raise ConfigError(f"runtime_config.tp_comm must be 'fused' or 'reference', got {self.tp_comm!r}.")


@dataclass
class LoftQConfig:
    """LoftQ settings: quantisation bit width and alternating iterations."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.loftq_bits, bool) or self.loftq_bits not in (2, 4, 8):
            raise ConfigError(f"loftq_bits must be 2, 4 or 8, got {self.loftq_bits!r}.")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"loftq_iter must be an integer >= 1, got {self.loftq_iter!r}.")


@dataclass
class EvaConfig:
    """EVA (explained variance adaptation) settings, as in PEFT."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        check_bools(self)
        if isinstance(self.label_mask_value, bool) or not isinstance(self.label_mask_value, int):
            raise ConfigError(f"EvaConfig.label_mask_value must be an integer, got {self.label_mask_value!r}.")
        for name in ("rho", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"EvaConfig.{name} must be a number, got {value!r}.")
        if not 1.0 <= self.rho < math.inf:
            raise ConfigError(
                f"EvaConfig.rho must be >= 1.0 and finite (each layer may get up to round(r·rho) components), "
                f"got {self.rho!r}."
            )
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(
                f"EvaConfig.tau must be in (0, 1] (the cosine similarity at which a component has converged), "
                f"got {self.tau!r}."
            )


@dataclass
class CordaConfig:
    """CorDA settings, as in PEFT. The file names may be ``str`` or ``os.PathLike`` (kept as str)."""

    cache_file: Optional[str] = None
    covariance_file: Optional[str] = None
    corda_method: Literal["ipm", "kpm"] = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        check_bools(self)
        for name in ("cache_file", "covariance_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"CordaConfig.{name} must be a file path or None, got {value!r}.")
            setattr(self, name, None if value is None else os.fspath(value))
        if self.corda_method not in ("ipm", "kpm"):
            raise ConfigError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}.")


def _as_list(value: Any) -> Any:
    """Sets and tuples become sorted/ordered lists; strings and None pass through."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _sub_config(cls: type, value: Any, name: str) -> Any:
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{name} has unknown keys {sorted(unknown)}.")
        return cls(**value)
    raise ConfigError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}.")


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
    # PEFT 0.21 fields of features not implemented here (see NOT_YET_SUPPORTED): defaults only.
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    lora_ga_config: Optional[Any] = None
    velora_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[Any] = None
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        if self.peft_type not in (None, "LORA"):
            raise ConfigError(f"peft_type must be 'LORA', got {self.peft_type!r}.")
        self.peft_type = "LORA"
        self.task_type = getattr(self.task_type, "value", self.task_type)  # a peft.TaskType -> its string
        self.target_modules = _as_list(self.target_modules)
        self.exclude_modules = _as_list(self.exclude_modules)
        self.modules_to_save = _as_list(self.modules_to_save)
        self.layers_to_transform = _as_list(self.layers_to_transform)
        self.layers_pattern = _as_list(self.layers_pattern)
        self.rank_pattern = _pattern_dict(self.rank_pattern, "rank_pattern")
        self.alpha_pattern = _pattern_dict(self.alpha_pattern, "alpha_pattern")
        self.init_lora_weights = canonical_init_lora_weights(self.init_lora_weights)
        self.megatron_config = megatron_config_to_dict(self.megatron_config)
        if self.loftq_config:
            self.loftq_config = _sub_config(LoftQConfig, self.loftq_config, "loftq_config")
        else:
            self.loftq_config = {}
        self.eva_config = _sub_config(EvaConfig, self.eva_config, "eva_config")
        self.corda_config = _sub_config(CordaConfig, self.corda_config, "corda_config")
        self.runtime_config = _sub_config(LoraRuntimeConfig, self.runtime_config, "runtime_config") or LoraRuntimeConfig()
        if isinstance(self.layer_replication, (list, tuple)):
            self.layer_replication = [list(p) if isinstance(p, (list, tuple)) else p for p in self.layer_replication]
        self._validate()

    def _validate(self) -> None:
        check_bools(self)
        refuse_unsupported_features(self)
        _check_metadata(self)
        _check_rank(self.r, "r")
        _check_rank(self.qalora_group_size, "qalora_group_size")  # used by QALoRA only, as in PEFT
        for key, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in [("lora_alpha", self.lora_alpha)] + [
            (f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()
        ]:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise ConfigError(f"{key} must be a finite number, got {alpha!r}.")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or not (
            0.0 <= self.lora_dropout < 1.0
        ):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        _check_module_names(self)
        _check_layers(self)
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True is not supported together with use_dora=True.")
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(  # as PEFT, which would refuse to load such a config
                f"lora_bias=True is only supported with init_lora_weights=True or False, got {self.init_lora_weights!r}."
            )
        if self.megatron_core is not None and self.megatron_core not in MEGATRON_CORE_ALLOWLIST:
            raise ConfigError(
                f"megatron_core={self.megatron_core!r} is not an allowed module; allowed: "
                f"{list(MEGATRON_CORE_ALLOWLIST)}."
            )
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ConfigError("init_lora_weights='loftq' needs loftq_config (a LoftQConfig).")
        if self.layer_replication is not None:
            check_layer_replication(self.layer_replication)

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


def _check_rank(rank: Any, name: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {rank!r}.")


def refuse_unsupported_features(config: "LoraConfig") -> None:
    """ConfigError naming every NOT_YET_SUPPORTED field ``config`` sets to a non-default value."""
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.name in NOT_YET_SUPPORTED}
    used = [name for name, default in defaults.items() if getattr(config, name) != default]
    if used:
        found = ", ".join(f"{name}={getattr(config, name)!r} ({NOT_YET_SUPPORTED[name]})" for name in used)
        fixes = ", ".join(f"{name}={defaults[name]!r}" for name in used)
        raise ConfigError(f"LoraConfig uses PEFT features dist_lora does not support: {found}. Use {fixes}.")


def canonical_init_lora_weights(value: Any) -> InitValue:
    """``value`` in PEFT's spelling (``"OLoRA"`` -> ``"olora"``, as PEFT reads it), or ConfigError
    for a value PEFT does not understand."""
    if isinstance(value, bool) or value in INIT_METHODS:
        return value
    lower = value.lower() if isinstance(value, str) else None
    if lower in _CASE_INSENSITIVE_INIT:
        return lower
    match = _PISSA_NITER.fullmatch(value) if isinstance(value, str) else None
    if match:
        niter = match.group(1)
        if not (niter.isascii() and niter.isdigit()):
            raise ConfigError(
                f"init_lora_weights={value!r}: the number of subspace iterations must be a "
                "non-negative integer, e.g. 'pissa_niter_16'."
            )
        return value
    if lower in INIT_METHODS or (lower and _PISSA_NITER.fullmatch(lower)):
        raise ConfigError(
            f"init_lora_weights={value!r}: PEFT reads this value case-sensitively (it would fail on it); "
            f"write {lower!r}."
        )
    raise ConfigError(
        f"init_lora_weights must be True, False, one of {list(INIT_METHODS)} or 'pissa_niter_<N>', got {value!r}."
    )


@dataclass(frozen=True)
class InitKind:
    """What an ``init_lora_weights`` value does: the one classification of init methods.

    ``InitKind.of(value)`` (or ``LoraConfig.init_kind``) reads a value in PEFT's spelling
    (ConfigError otherwise, as :func:`canonical_init_lora_weights`). Its properties:

      seeded          True, False, "gaussian": factors drawn from the adapter's seed; the base
                      weight is neither read nor changed
      weight_driven   "pissa", "pissa_niter_<N>", "olora": factors from the base weight's SVD / QR
      data_driven     "eva", "corda": factors from the layers' inputs (a data pass)
      rewrites_base   PiSSA / OLoRA / CorDA (W <- W - s·B0·A0) and LoftQ (W <- its quantisation):
                      a saved adapter is only valid on the rewritten base
      convertible     PiSSA / OLoRA / CorDA: releasable as a plain rank-2r LoRA for the
                      original base (:mod:`dist_lora.checkpoint.conversion`)
      supported       not in ``NOT_YET_SUPPORTED_INIT`` (a config may name those; a new
                      adapter may not)
    """

    value: InitValue  # as PEFT spells it
    method: InitValue  # ``value``, but "pissa" for "pissa_niter_<N>"
    niter: Optional[int] = None  # N of "pissa_niter_<N>": the randomised SVD's subspace iterations

    @classmethod
    def of(cls, value: Any) -> "InitKind":
        value = canonical_init_lora_weights(value)
        match = _PISSA_NITER.fullmatch(value) if isinstance(value, str) else None
        if match:
            return cls(value, "pissa", int(match.group(1)))
        return cls(value, value)

    @property
    def _kind(self) -> tuple[Optional[str], Optional[str]]:
        return _INIT_KINDS.get(self.method, (None, None))  # NOT_YET_SUPPORTED_INIT: not classified

    @property
    def seeded(self) -> bool:
        return self._kind[0] == "seed"

    @property
    def weight_driven(self) -> bool:
        return self._kind == ("weight", "residual")

    @property
    def data_driven(self) -> bool:
        return self._kind[0] == "data"

    @property
    def rewrites_base(self) -> bool:
        return self._kind[1] is not None

    @property
    def convertible(self) -> bool:
        return self._kind[1] == "residual"

    @property
    def supported(self) -> bool:
        return self.method not in NOT_YET_SUPPORTED_INIT


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
        _compile(key, f"{name} key {key!r}")
        _compile(rf"(.*\.)?({key})$", f"{name} key {key!r} in PEFT's rule (.*\\.)?(key)$")
    return dict(value)


def _compile(pattern: str, what: str) -> None:
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
            _compile(value, f"{name}={value!r} (a string is a regex that must match whole module names)")
        elif value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{name} must be a string (regex) or a list of strings, got {value!r}.")
    saved = config.modules_to_save
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(v, str) for v in saved)):
        raise ConfigError(f"modules_to_save must be a list of module names, e.g. ['lm_head'], got {saved!r}.")


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
            _compile(p, f"layers_pattern entry {p!r}")


def check_layer_replication(ranges: Any) -> None:
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

