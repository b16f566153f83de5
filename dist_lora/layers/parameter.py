"""LoRA on one parameter of a module (PEFT's ``target_parameters``): the fused 3-D expert
weights of transformers 5 MoE models, or any 2-D weight a module uses directly.

For a parameter P of E experts, [E, out, in] (F.linear orientation; [E, in, out] when the
module says ``is_transposed``), and an adapter of per-expert rank r, while the module runs

    P_e  ->  P_e + s · B_e A_e,      s = alpha / r  (alpha / sqrt(r) with use_rslora)

with A_e, B_e stacked as PEFT stacks them (:mod:`dist_lora.expert_layout`: lora_A [r·E, in],
lora_B [out, r·E]). A 2-D parameter [out, in] is the case E = 1 (ΔW = s·B A). The module's own
forward computes with the updated tensor (``torch.func.functional_call``), so routing, gating
and the expert kernels are the model's; the delta [E, out, in] is formed once per forward, in
the parameter's dtype from the fp32 factors. Several parameters of one module nest as in PEFT
(the wrapper of the first registered parameter innermost), so saved keys are PEFT's:
``<module>.lora_A.weight`` for the outermost, ``<module>.base_layer.lora_A.weight`` below it.

As PEFT's ``ParamWrapper``, refused: dropout (it acts on the module's input, not a weight),
DoRA, lora_bias, fan_in_fan_out, inits that read or rewrite the base weight; also refused here:
a ZeRO-3 partitioned parameter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from ..config import ConfigError, InitKind
from ..expert_layout import expert_delta, parameter_geometry
from ..parallel import zero
from . import math as lm
from .base import LoraLayer


def innermost_module(module: nn.Module) -> nn.Module:
    """The module a (possibly nested) :class:`LoraParameter` stack wraps; any other module itself."""
    while isinstance(module, LoraParameter):
        module = module.base_layer
    return module


class LoraParameter(LoraLayer):
    """Adapters on the parameter ``parameter_name`` of ``base_layer`` (a module, or another
    LoraParameter of the same module, for a second parameter)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        owner = innermost_module(base_layer)
        zero.refuse_registered(base_layer, f"cannot wrap parameter {parameter_name!r} of {type(owner).__name__} in LoRA")
        param = getattr(owner, parameter_name, None)
        if not isinstance(param, nn.Parameter):
            raise ConfigError(f"{type(owner).__name__} has no parameter {parameter_name!r} to adapt.")
        if zero.is_zero3_param(param):
            raise NotImplementedError(f"target_parameters on a ZeRO-3 partitioned parameter ({parameter_name!r}) is not supported.")
        transposed = param.dim() == 3 and bool(getattr(owner, "is_transposed", False))
        try:
            experts, in_features, out_features = parameter_geometry(param.shape, transposed)
        except ValueError as e:
            raise ConfigError(f"target_parameters: {type(owner).__name__}.{parameter_name}: {e}") from None
        super().__init__(base_layer, in_features, out_features)
        self.parameter_name = parameter_name
        self.num_experts = experts
        self.transposed = transposed
        self.stacked = param.dim() == 3
        depth, inner = 0, base_layer
        while isinstance(inner, LoraParameter):
            depth, inner = depth + 1, inner.base_layer
        self._path = "base_layer." * depth + parameter_name  # the parameter, seen from base_layer

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(innermost_module(self.base_layer), self.parameter_name)

    def factor_shapes(self, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """A [r·E, in], B [out, r·E] (PEFT's stacking)."""
        return (r * self.num_experts, self.in_features), (self.out_features, r * self.num_experts)

    def check_saved_factor(self, factor: int, value: torch.Tensor, key: str, adapter_name: str) -> None:
        """A saved factor must stack ``num_experts`` experts of the adapter's rank r: a file for
        another expert count (stacked rank ≠ r·E) is refused naming both counts."""
        super().check_saved_factor(factor, value, key, adapter_name)
        r, stacked = self.r[adapter_name], value.shape[0] if factor == 0 else value.shape[1]
        if stacked != r * self.num_experts:
            found = f"{stacked // r} experts" if stacked % r == 0 else f"a rank that is no multiple of r={r}"
            raise ConfigError(
                f"{key}: stacked rank {stacked} holds {found} of rank r={r}, but {type(innermost_module(self)).__name__}."
                f"{self.parameter_name} has {self.num_experts} experts (expected stacked rank r·E = "
                f"{r * self.num_experts}); was this adapter trained on a model with another expert count?"
            )

    def init_factors(self, r: int, init, seed: int, lora_bias: bool):
        return lm.init_lora_factors(r, self.in_features, self.out_features, init, seed, lora_bias, stack=self.num_experts)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights=True, use_rslora: bool = False, lora_bias: bool = False,
                     use_dora: bool = False, seed: int = 0, device: Optional[torch.device] = None,
                     loftq_config=None) -> None:
        """:meth:`LoraLayer.update_layer` for stacked factors; refuses what PEFT's ParamWrapper refuses."""
        kind = InitKind.of(init_lora_weights)
        refused = [
            what for what, bad in (
                (f"lora_dropout={lora_dropout}", lora_dropout > 0), ("use_dora=True", use_dora),
                ("lora_bias=True", lora_bias), (f"init_lora_weights={init_lora_weights!r}", not kind.seeded),
            ) if bad
        ]
        if refused:
            raise ConfigError(f"LoRA on parameter {self.parameter_name!r} (target_parameters) does not support {', '.join(refused)}.")
        super().update_layer(adapter_name, r, lora_alpha, 0.0, init_lora_weights, use_rslora, False, False, seed, device)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the parameter's shape, fp32: [E, out, in] (s · B_e A_e per expert), [out, in] for 2-D."""
        return self._delta(adapter_name, torch.float32)

    def _delta(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight.to(dtype), self.lora_B[adapter_name].weight.to(dtype)
        delta = expert_delta(a, b, self.num_experts, self.scaling[adapter_name], self.transposed)
        return delta if self.stacked else delta[0]

    def forward(self, *args, **kwargs):
        adapters = self._forward_adapters()
        if not adapters:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        updated = weight + sum(self._delta(name, dtype) for name in adapters)
        return functional_call(self.base_layer, {self._path: updated}, args, kwargs, tie_weights=False, strict=False)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, " + super().extra_repr()
