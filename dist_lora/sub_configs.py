"""LoraConfig's sub-configs (PEFT's ``LoftQConfig``, ``EvaConfig``, ``CordaConfig`` and the
runtime settings), each validated in ``__post_init__``, and :func:`sub_config`, which builds one
from the dict an adapter_config.json holds."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

from .config_rules import check_bools
from .errors import ConfigError


EXPERT_ADAPTERS = ("per_expert", "shared")


@dataclass
class LoraRuntimeConfig:
    """Runtime-only settings (never saved).

    ``ephemeral_gpu_offload`` is PEFT's field (accepted, no effect here). The others choose
    how tensor-parallel LoRA layers communicate (see :mod:`dist_lora.layers.parallel`):
    ``tp_comm`` "fused" (default: no collective beyond the frozen base's) or "reference"
    (PEFT's design, one r-sized collective per LoRA path); ``keep_gathered_input`` keeps the
    sequence-gathered input of column-parallel layers under sequence parallelism instead of
    re-gathering it in backward (more memory, one all-gather less per layer).

    ``expert_adapters`` (megatron MoE experts): "per_expert" (default) gives every expert of a
    MoE layer its own adapter on ``linear_fc1`` / ``linear_fc2``; "shared" gives all experts of
    a layer one adapter per projection (as Megatron-Bridge offers), initialised from the layer's
    expert-free name (``decoder.layers.N.mlp.experts.linear_fc1``, which rank/alpha patterns
    also see) and trained on the tokens of every expert (its gradient is summed over the
    experts and the expert-parallel ranks). Files stay per-expert: a shared adapter is saved
    as identical per-expert copies, which is exactly what it computes.
    """

    ephemeral_gpu_offload: bool = False
    tp_comm: str = "fused"
    keep_gathered_input: bool = False
    expert_adapters: str = "per_expert"

    def __post_init__(self) -> None:
        check_bools(self)
        if self.tp_comm not in ("fused", "reference"):
            raise ConfigError(f"runtime_config.tp_comm must be 'fused' or 'reference', got {self.tp_comm!r}.")
        if self.expert_adapters not in EXPERT_ADAPTERS:
            raise ConfigError(
                f"runtime_config.expert_adapters must be one of {EXPERT_ADAPTERS}, got {self.expert_adapters!r}."
            )


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


def sub_config(cls: type, value: Any, name: str) -> Any:
    """``value`` (None, a ``cls`` or a dict of its fields) as a ``cls`` (or None); ``name`` is the field."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{name} has unknown keys {sorted(unknown)}.")
        return cls(**value)
    raise ConfigError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}.")
