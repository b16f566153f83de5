"""LoRA on a plain ``nn.Linear`` and on transformers' ``Conv1D`` (GPT-2's [in, out] weights)."""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from ..config import InitKind
from ..parallel import zero
from . import math as lm
from .base import LoraLayer, MergedValues
from .fused import ColumnParallelLoRA, FusedSpec
from .kinds import is_conv1d, is_linear4bit


class LoraLinear(LoraLayer):
    """y = base(x) + Σ_active s · B A dropout(x)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        conv1d = is_conv1d(base_layer)
        if conv1d and not fan_in_fan_out:
            warnings.warn("fan_in_fan_out is False but the target is a Conv1D ([in, out] weight); using True.")
        elif not conv1d and fan_in_fan_out:
            warnings.warn("fan_in_fan_out is True but the target is an nn.Linear ([out, in] weight); using False.")
        zero.refuse_registered(base_layer, f"cannot wrap {type(base_layer).__name__} in LoRA")
        shape = zero.full_shape(base_layer.weight)  # ZeRO-3: param.shape is the empty local piece
        in_features, out_features = (shape[0], shape[1]) if conv1d else (shape[1], shape[0])
        quantized = is_linear4bit(base_layer)
        if quantized:  # bitsandbytes 4-bit: the packed weight's shape is not [out, in]
            in_features, out_features = base_layer.in_features, base_layer.out_features
        super().__init__(base_layer, in_features, out_features)
        self._fan_in_fan_out = conv1d
        self.quantized = quantized
        zero.mark_leaf(self)  # ZeRO-3: forward reads base weight and factors directly

    def update_layer(self, adapter_name: str, *args, **kwargs) -> None:
        """:meth:`LoraLayer.update_layer`, with the base weight gathered under ZeRO-3 when the
        init reads it (one that rewrites it, :attr:`InitKind.rewrites_base`, or DoRA's norm);
        rank 0's rewrite of it (e.g. PiSSA/OLoRA's residual) is the one re-partitioned (see
        :mod:`dist_lora.parallel.zero`). Without ZeRO-3 this is the plain call."""
        zero.refuse_registered(self, f"cannot add adapter {adapter_name!r}")
        bound = inspect.signature(LoraLayer.update_layer).bind(self, adapter_name, *args, **kwargs)
        bound.apply_defaults()
        init = bound.arguments["init_lora_weights"]
        kind = InitKind.of(init)
        if self.quantized and (bound.arguments["use_dora"] or not kind.seeded):
            raise NotImplementedError(
                f"on a bitsandbytes 4-bit base layer only init_lora_weights=True/False/'gaussian' without DoRA is "
                f"supported, got init_lora_weights={init!r}, use_dora={bound.arguments['use_dora']} (for LoftQ on a "
                "4-bit model use dist_lora.init.replace_lora_weights_loftq after adding the adapter)."
            )
        rewrites = kind.rewrites_base
        reads = rewrites or bound.arguments["use_dora"]
        device = bound.arguments["device"]
        on_meta = device is not None and torch.device(device).type == "meta"
        weights = [self.base_weight] if reads and not on_meta else []
        with zero.gathered(weights, modifier_rank=0 if rewrites else None):
            super().update_layer(adapter_name, *args, **kwargs)

    @property
    def fan_in_fan_out(self) -> bool:
        return self._fan_in_fan_out

    def merged_values(self, adapter_names: list[str]) -> MergedValues:
        """:meth:`LoraLayer.merged_values` (what merge and safe_merge's check use); refused on 4-bit."""
        if self.quantized:
            raise NotImplementedError("merging into a bitsandbytes 4-bit base layer is not supported; dequantise the model first.")
        return super().merged_values(adapter_names)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self._forward_adapters()
        if adapters and not args and not kwargs and self._can_fuse(x, adapters):
            return self._forward_fused(x, adapters)
        result = base_out = self.base_layer(x, *args, **kwargs)
        for name in adapters:
            lora_b = self.lora_B[name]
            if self.is_dora(name):
                result = result + self._dora_forward(x, base_out, name).to(result.dtype)
                continue
            h = lm.lora_down(x, self.lora_A[name].weight, self.scaling[name], self.lora_dropout[name])
            result = result + lm.lora_up(h, lora_b.weight, lora_b.bias, self.scaling[name]).to(result.dtype)
        return result

    def _dora_forward(self, x: torch.Tensor, base_out: torch.Tensor, name: str) -> torch.Tensor:
        """(m/n - 1) · W x_d + (m/n) · s · B A x_d (see :mod:`dist_lora.layers.math`)."""
        dropout = self.lora_dropout[name]
        weight = self.base_weight.t() if self._fan_in_fan_out else self.base_weight
        if self.training and isinstance(dropout, nn.Dropout):
            x = dropout(x)
            base_nobias = torch.nn.functional.linear(x.to(weight.dtype), weight)
        else:
            bias = getattr(self.base_layer, "bias", None)
            base_nobias = base_out if bias is None else base_out - bias
        h = lm.lora_down(x, self.lora_A[name].weight, self.scaling[name], nn.Identity())
        lora_out = lm.lora_up(h, self.lora_B[name].weight, None, self.scaling[name])
        return lm.dora_output(base_nobias, lora_out, self._dora_scale(name))

    def _can_fuse(self, x: torch.Tensor, adapters: list[str]) -> bool:
        """The one-function path needs a frozen plain Linear/Conv1D and an input in the base's
        dtype (the adapters compute in it: lm.in_compute_dtype)."""
        base = self.base_layer
        return (
            (type(base) is nn.Linear or self._fan_in_fan_out)
            and not base.weight.requires_grad
            and not any(self.is_dora(n) for n in adapters)
            and x.dtype == base.weight.dtype
        )

    def _forward_fused(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """Base and adapters in one autograd function (a column-parallel layer at TP=1): the
        LoRA output and input gradient accumulate into the base's in place, no out-sized
        temporaries (see :mod:`dist_lora.layers.fused`)."""
        base = self.base_layer
        factors = []
        for name in adapters:
            lora_b = self.lora_B[name]
            factors += [*(lm.in_compute_dtype(f, x) for f in (self.lora_A[name].weight, lora_b.weight, lora_b.bias)),
                        self._dropout_mask(name, x.shape, x)]
        spec = FusedSpec(group=None, tp_size=1, sequence_parallel=False, scalings=tuple(self.scaling[n] for n in adapters))
        weight = base.weight.t() if self._fan_in_fan_out else base.weight
        return ColumnParallelLoRA.apply(x, weight, base.bias, spec, *factors)
