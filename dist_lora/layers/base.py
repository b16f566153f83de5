"""LoraLayer: a frozen base layer plus any number of named adapters.

Subclasses say only how their factors are sharded (``shard_a`` / ``shard_b``) and how the
r-sized intermediate travels between A and B (``forward``). Initialisation, adapter
bookkeeping and merging live here and use :mod:`dist_lora.layers.math`.
"""

from __future__ import annotations

import warnings
from typing import Iterable, NamedTuple, Optional

import torch
from torch import nn

from ..config import ConfigError, InitKind, InitValue
from ..factors.checks import check_base_dtype, check_rank_fits
from ..factors.corda_math import corda_factors
from ..factors.loftq import loftq_factors
from ..factors.weight_driven import weight_driven_factors
from . import math as lm


class MergedValues(NamedTuple):
    """What a merge writes (:meth:`LoraLayer.merged_values`): the new base weight and bias in
    their own dtypes (bias None: unchanged) and the DoRA row scales kept for unmerging."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    dora_scales: dict[str, torch.Tensor]

    def non_finite(self) -> Optional[str]:
        """"weight" or "bias" if that value has a NaN or Inf, else None."""
        return lm.non_finite({"weight": self.weight, "bias": self.bias})


class LoraLayer(nn.Module):
    """Base class of every LoRA-wrapped layer.

    Parameters are ``lora_A[adapter]`` ([r, in] or its shard) and ``lora_B[adapter]``
    ([out, r] or its shard), each an ``nn.Linear`` so that state-dict keys match PEFT's
    (``<module>.lora_A.<adapter>.weight``).
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    factor_keys = ("lora_A.weight", "lora_B.weight")  # PEFT's saved names of A and B (embeddings differ)

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features  # global (unsharded) sizes
        self.out_features = out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA: m [out] (or its row shard) as ``.weight``
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        self._dora_merge_scale: dict[str, torch.Tensor] = {}  # m / ||W + ΔW|| used when merged
        self._active_adapters: list[str] = []
        self._disable_adapters = False

    # --- sharding (overridden by parallel layers) -------------------------------------------

    def shard_a(self, a: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full A [r, in]."""
        return a

    def shard_b(self, b: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full B [out, r] (or of B's bias [out])."""
        return b

    def _tag_parameters(self, adapter_name: str) -> None:
        """Attach sharding (and partial-gradient) attributes to the new adapter's parameters (parallel layers)."""

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter of this layer: A, B (and its bias), DoRA's m, of all adapters."""
        return [p for store in self.adapter_layer_names for p in getattr(self, store).parameters()]

    def _reduce_norm_sq(self, norm_sq: torch.Tensor) -> torch.Tensor:
        """Complete a row-wise squared norm over the shards of the input dim (row-parallel)."""
        return norm_sq

    @property
    def fan_in_fan_out(self) -> bool:
        return False

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # --- adapters ------------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: InitValue = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        use_dora: bool = False,
        seed: int = 0,
        device: Optional[torch.device] = None,
        loftq_config=None,
    ) -> None:
        """Add (or re-create) adapter ``adapter_name`` of rank ``r``.

        ``device="meta"`` creates empty parameters (``low_cpu_mem_usage``); they are
        materialised when a state dict is loaded with ``assign=True``. ``loftq_config``
        (a LoftQConfig) is used by ``init_lora_weights="loftq"``.
        """
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}.")
        kind = InitKind.of(init_lora_weights)
        dtype = self._adapter_dtype()
        on_meta = device is not None and torch.device(device).type == "meta"
        if on_meta:
            shape_a, shape_b = self.factor_shapes(r)
            a = torch.empty(shape_a, device="meta")
            b = torch.empty(shape_b, device="meta")
            bias = torch.empty(self.out_features, device="meta") if lora_bias else None
        else:
            a, b, bias = self.init_factors(r, kind.value, seed, lora_bias)
        scaling = lm.lora_scaling(lora_alpha, r, use_rslora)
        residual = None
        if kind.weight_driven and not on_meta:
            # this rank's parts of A and B, computed from (this rank's shard of) the base weight
            a, b, residual = self._weight_driven_init(r, scaling, kind.value, seed)
        elif kind.rewrites_base and not on_meta:
            # CorDA / LoftQ: this rank's A and B parts and its new base weight shard
            a, b, residual = self._data_driven_init(r, scaling, kind.method, loftq_config)
        else:
            a, b = self.shard_a(a), self.shard_b(b)
        bias = None if bias is None else self.shard_b(bias)
        target = "meta" if on_meta else (device or self.base_weight.device)
        lora_a = nn.Linear(a.shape[1], a.shape[0], bias=False, device="meta")
        lora_b = nn.Linear(b.shape[1], b.shape[0], bias=lora_bias, device="meta")
        lora_a.weight = nn.Parameter(a.to(device=target, dtype=dtype))
        lora_b.weight = nn.Parameter(b.to(device=target, dtype=dtype))
        if lora_bias:
            lora_b.bias = nn.Parameter(bias.to(device=target, dtype=dtype))
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = scaling
        if residual is not None:  # PiSSA/OLoRA/CorDA: W <- W - s·B·A (LoftQ: Q), before DoRA's norm (as PEFT)
            weight = self.base_weight
            weight.data.copy_((residual.t() if self.fan_in_fan_out else residual).to(weight.dtype))
            if kind.method == "corda":
                del self.base_layer.corda_eigens  # used up, as in PEFT
        if use_dora:
            if lora_bias:
                raise ValueError("lora_bias is not supported together with use_dora.")
            magnitude = nn.Module()
            if on_meta:
                m = torch.empty(b.shape[0], device="meta")
            else:
                m = self.dora_weight_norm(adapter_name).to(device=target, dtype=dtype)
            magnitude.weight = nn.Parameter(m)
            self.lora_magnitude_vector[adapter_name] = magnitude
        elif adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self._tag_parameters(adapter_name)
        if adapter_name not in self._active_adapters and not self._active_adapters:
            self._active_adapters = [adapter_name]
        self._set_requires_grad()

    def factor_shapes(self, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The full (unsharded) shapes of A and B of a rank-``r`` adapter: [r, in], [out, r]."""
        return (r, self.in_features), (self.out_features, r)

    def check_saved_factor(self, factor: int, value: torch.Tensor, key: str, adapter_name: str) -> None:
        """ConfigError if the full saved ``value`` of adapter ``adapter_name``'s A (``factor`` 0)
        or B (1), under ``key``, does not fit this layer's features."""
        if factor == 0 and value.shape[1] != self.in_features:
            raise ConfigError(f"{key}: in_features {value.shape[1]} in the file, the model has {self.in_features}.")
        if factor == 1 and value.shape[0] != self.out_features:
            raise ConfigError(f"{key}: out_features {value.shape[0]} in the file, the model has {self.out_features}.")

    def init_factors(
        self, r: int, init: InitValue, seed: int, lora_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Full (unsharded) A, B and B's bias from one seed (:func:`lm.init_lora_factors`;
        embedding layers draw them their own way)."""
        return lm.init_lora_factors(r, self.in_features, self.out_features, init, seed, lora_bias)

    def _weight_driven_init(
        self, r: int, scaling: float, init: str, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PiSSA / OLoRA: this rank's parts of A and B and of the residual W - s·B·A (fp32;
        see :mod:`dist_lora.factors.weight_driven`). Validates everything before any change."""
        check_rank_fits(r, self.in_features, self.out_features, init)
        weight = self.base_weight
        check_base_dtype(weight.dtype, init)
        return self._weight_driven_factors(weight, r, scaling, init, seed)

    def _weight_driven_factors(
        self, weight: torch.Tensor, r: int, scaling: float, init: str, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = weight.t() if self.fan_in_fan_out else weight
        return weight_driven_factors(weight, r, scaling, init, seed)

    def _shard_info(self) -> dict:
        """How the base weight is split over TP (see :mod:`dist_lora.factors.loftq`); none here."""
        return {}

    def _data_driven_init(
        self, r: int, scaling: float, init: str, loftq_config
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CorDA (from ``base_layer.corda_eigens``, left by ``preprocess_corda``) or LoftQ:
        this rank's A and B parts and its new base weight shard (fp32)."""
        weight = self.base_weight
        check_base_dtype(weight.dtype, init)
        weight = weight.t() if self.fan_in_fan_out else weight
        if init == "corda":
            eigens = getattr(self.base_layer, "corda_eigens", None)
            if eigens is None:
                raise ValueError("init_lora_weights='corda' needs dist_lora.init.preprocess_corda(model, config, run_model) first.")
            if tuple(eigens.s.shape) != (r,):
                raise ValueError(f"the CorDA data has rank {eigens.s.shape[0]}, the adapter r={r}; rerun preprocess_corda.")
            return corda_factors(eigens, weight, scaling)
        if loftq_config is None:
            raise ValueError("init_lora_weights='loftq' needs loftq_config (a LoftQConfig).")
        return loftq_factors(
            weight, r, scaling, loftq_config.loftq_bits, loftq_config.loftq_iter, **self._shard_info()
        )

    def _adapter_dtype(self) -> torch.dtype:
        """Adapters of a half-precision base are kept in fp32 (PEFT's autocast_adapter_dtype)."""
        dtype = self.base_weight.dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point else dtype

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into {type(self).__name__}; unmerge it first.")
        for store in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if adapter_name in store:  # nn.ModuleDict.pop takes no default
                del store[adapter_name]
        for store in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            store.pop(adapter_name, None)
        self._active_adapters = [a for a in self._active_adapters if a != adapter_name]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make ``adapter_names`` the active adapters: trainable; all others frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapters = [n for n in names if n in self.lora_A]
        self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        for layer_name in self.adapter_layer_names:
            for name, module in getattr(self, layer_name).items():
                module.requires_grad_(name in self._active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Switch every adapter of this layer on or off (the base output is unchanged).

        Disabling unmerges merged adapters first (as PEFT does), so a disabled layer always
        computes the base function."""
        if not enabled and self.merged_adapters:
            self.unmerge()
        self._disable_adapters = not enabled

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _forward_adapters(self) -> list[str]:
        """Adapters whose output is added in forward: active, present, and not merged."""
        if self._disable_adapters:
            return []
        return [a for a in self._active_adapters if a in self.lora_A and a not in self.merged_adapters]

    def _dropout_mask(self, name: str, shape: torch.Size, like: torch.Tensor) -> Optional[torch.Tensor]:
        """An inverted-dropout mask (0 or 1/(1-p)) for the fused paths, or None when dropout is off."""
        dropout = self.lora_dropout[name]
        if not (self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0):
            return None
        keep = 1.0 - dropout.p
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)

    # --- merging -------------------------------------------------------------------------

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW for this rank's base weight shard, in fp32."""
        return lm.delta_weight(
            self.lora_A[adapter_name].weight,
            self.lora_B[adapter_name].weight,
            self.scaling[adapter_name],
            self.fan_in_fan_out,
        )

    @torch.no_grad()
    def dora_weight_norm(self, adapter_name: str, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """||W + ΔW||_row for this rank's output rows, fp32, no gradient; row-parallel shards
        sum their squared norms over TP (one out-sized all-reduce)."""
        weight = self.base_weight if weight is None else weight
        norm_sq = lm.dora_norm_sq(weight, self.get_delta_weight(adapter_name), self.fan_in_fan_out)
        return self._reduce_norm_sq(norm_sq).sqrt()

    def is_dora(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_magnitude_vector

    def _dora_scale(self, adapter_name: str) -> torch.Tensor:
        """m / ||W + ΔW||_row (gradient to m only)."""
        return lm.dora_scale(self.lora_magnitude_vector[adapter_name].weight, self.dora_weight_norm(adapter_name))

    def _delta_bias(self, adapter_name: str) -> Optional[torch.Tensor]:
        """s · b of a lora_bias adapter in fp32 (None without lora_bias)."""
        bias = self.lora_B[adapter_name].bias
        return None if bias is None else lm.scaled_bias(bias.float(), self.scaling[adapter_name])

    @torch.no_grad()
    def merged_values(self, adapter_names: list[str]) -> MergedValues:
        """What merging ``adapter_names`` (present, not yet merged) would write, changing nothing:
        :func:`lm.merged_weight` / :func:`lm.merged_bias` cast to the base dtypes. A DoRA adapter's
        norm is taken on the weight without any merged adapter (row-parallel shards: all-reduced
        over TP, so every TP rank must call this). Refuses lora_bias on a base without bias."""
        weight = self.base_weight
        base = self._unmerged(weight) if any(self.is_dora(n) for n in adapter_names) else None
        scales = [
            lm.dora_merge_scale(self.lora_magnitude_vector[n].weight, self.dora_weight_norm(n, base))
            if self.is_dora(n) else None
            for n in adapter_names
        ]
        steps = ((self.get_delta_weight(n), scale) for n, scale in zip(adapter_names, scales))  # one ΔW at a time
        new_weight = lm.merged_weight(weight, steps, self.fan_in_fan_out).to(weight.dtype)
        bias = getattr(self.base_layer, "bias", None)
        bias_deltas = [d for d in (self._delta_bias(n) for n in adapter_names) if d is not None]
        if bias_deltas and bias is None:
            raise ValueError(f"{type(self).__name__} has lora_bias adapters but its base layer has no bias to merge into.")
        new_bias = lm.merged_bias(bias, bias_deltas).to(bias.dtype) if bias_deltas else None
        dora_scales = {n: scale for n, scale in zip(adapter_names, scales) if scale is not None}
        return MergedValues(new_weight, new_bias, dora_scales)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """W += ΔW for each adapter (DoRA: then the row rescale), computed in fp32 and cast back
        to W's dtype (:meth:`merged_values`).

        With ``safe_merge`` the values to be written are checked finite before any weight changes.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.lora_A]
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"adapters {already} are already merged; skipping them.")
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        values = self.merged_values(names)
        if safe_merge and values.non_finite() is not None:
            raise ValueError(f"merging adapters {names} gives NaN or Inf weights; nothing was merged.")
        self.base_weight.copy_(values.weight)
        if values.bias is not None:
            self.base_layer.bias.copy_(values.bias)
        self._dora_merge_scale.update(values.dora_scales)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= ΔW for every merged adapter (restores W to fp32 rounding)."""
        if not self.merged_adapters:
            return
        weight = self.base_weight
        new_weight = self._unmerged(weight)
        self._dora_merge_scale.clear()
        weight.copy_(new_weight.to(weight.dtype))
        bias = getattr(self.base_layer, "bias", None)
        deltas = [d for d in (self._delta_bias(n) for n in self.merged_adapters) if d is not None]
        if deltas:
            bias.copy_(lm.unmerged_bias(bias, deltas).to(bias.dtype))
        self.merged_adapters = []

    def _unmerged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in fp32 with the merged adapters taken out, last merged first."""
        steps = ((self.get_delta_weight(n), self._dora_merge_scale.get(n)) for n in reversed(self.merged_adapters))
        return lm.unmerged_weight(weight, steps, self.fan_in_fan_out)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{a}: r={r}" for a, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=({ranks})"
