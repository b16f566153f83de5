"""LoRA on a megatron MoE router (``TopKRouter``).

The router is a replicated linear map in function: logits = x Wᵀ (W [experts, hidden], no TP
split), computed by ``router_gating_linear`` in the router's dtype, then top-k routing. LoRA
adds its update to the logits before routing:

    logits = x Wᵀ + s · B (A · dropout(x))      (:func:`dist_lora.layers.math.lora_down` / ``lora_up``)

so a merged router weight is W + s·B A as for any linear layer. Megatron's own routing
(score function, top-k, aux losses, expert bias) runs unchanged on the adapted logits: the
layer lends the router a ``gating`` that adds the LoRA term for the duration of one forward.

Both factors are replicated. Under sequence parallelism the router sees this TP rank's
sequence shard, so their gradients are partial sums over TP, tagged ``tp_partial_grad`` and
summed once per step (megatron marks the router weight ``sequence_parallel`` for the same
reason); without it every TP rank sees every token and the gradients are complete.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..parallel import grads, tp
from . import math as lm
from .base import LoraLayer


class LoraRouter(LoraLayer):
    """LoRA on a megatron ``TopKRouter``: A [r, hidden], B [experts, r], both replicated."""

    def __init__(self, base_layer: nn.Module) -> None:
        experts, hidden = base_layer.weight.shape
        super().__init__(base_layer, hidden, experts)
        _, tp_size = tp.group_rank_size(getattr(base_layer, "tp_group", None))
        self.sequence_parallel = bool(getattr(base_layer.config, "sequence_parallel", False)) and tp_size > 1

    def _tag_parameters(self, adapter_name: str) -> None:
        params = self.adapter_parameters()
        grads.mark_tp_partial_grads(params, params if self.sequence_parallel else [])

    def _lora_logits(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        out = None
        for name in adapters:
            lora_b = self.lora_B[name]
            h = lm.lora_down(x, self.lora_A[name].weight, self.scaling[name], self.lora_dropout[name])
            y = lm.lora_up(h, lora_b.weight, lora_b.bias, self.scaling[name])
            out = y if out is None else out + y
        return out

    @contextlib.contextmanager
    def _adapted_gating(self, adapters: list[str]) -> Iterator[None]:
        base = self.base_layer
        gating = base.gating

        def gating_with_lora(x: torch.Tensor) -> torch.Tensor:
            logits = gating(x)
            return logits + self._lora_logits(x, adapters).to(logits.dtype)

        base.gating = gating_with_lora  # an instance attribute for this call only
        try:
            yield
        finally:
            del base.gating

    def forward(self, *args, **kwargs):
        adapters = self._forward_adapters()
        if any(self.is_dora(n) for n in adapters):
            raise NotImplementedError("use_dora is not supported on a MoE router.")
        if not adapters:
            return self.base_layer(*args, **kwargs)
        with self._adapted_gating(adapters):
            return self.base_layer(*args, **kwargs)
