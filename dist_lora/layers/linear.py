"""LoRA on a plain ``nn.Linear`` and on transformers' ``Conv1D`` (GPT-2's [in, out] weights)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import math as lm
from .base import LoraLayer


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (a linear layer whose weight is stored [in, out])."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class LoraLinear(LoraLayer):
    """y = base(x) + Σ_active s · B A dropout(x)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        conv1d = is_conv1d(base_layer)
        if conv1d and not fan_in_fan_out:
            warnings.warn("fan_in_fan_out is False but the target is a Conv1D ([in, out] weight); using True.")
        elif not conv1d and fan_in_fan_out:
            warnings.warn("fan_in_fan_out is True but the target is an nn.Linear ([out, in] weight); using False.")
        weight = base_layer.weight
        in_features, out_features = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])
        super().__init__(base_layer, in_features, out_features)
        self._fan_in_fan_out = conv1d

    @property
    def fan_in_fan_out(self) -> bool:
        return self._fan_in_fan_out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self._forward_adapters():
            lora_b = self.lora_B[name]
            h = lm.lora_down(x, self.lora_A[name].weight, self.scaling[name], self.lora_dropout[name])
            result = result + lm.lora_up(h, lora_b.weight, lora_b.bias, self.scaling[name]).to(result.dtype)
        return result
