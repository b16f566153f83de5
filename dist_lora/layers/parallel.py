"""LoRA on megatron-core's ColumnParallelLinear and RowParallelLinear.

Notation: TP ranks i = 0..t-1, base weight W ∈ R^{out×in}, s the LoRA scale.

Column-parallel base (W_i = rows of W): A replicated on every rank, B_i = rows i of B.
    h = s · A x               identical on every rank (x replicated, or sequence-gathered under SP)
    y_i = W_i x + B_i h       this rank's output columns; gathered only if the base gathers
  Backward: dh = Σ_i B_iᵀ dy_i needs a sum over TP. ``copy_to_tensor_model_parallel_region`` on
  h is that sum (one r-sized all-reduce), after which dA = dh xᵀ and dx = Aᵀ dh are complete
  and identical on every rank: A stays replicated with no further synchronisation.
  Under SP the LoRA path gathers the sequence itself (its gradient is already complete, so
  the gather's backward keeps this rank's chunk instead of reduce-scattering).

Row-parallel base (W_i = columns of W, x_i = features i): A_i = columns i of A, B replicated.
    h = Σ_i s · A_i x_i       one r-sized all-reduce (``reduce_from_tensor_model_parallel_region``)
    y = Σ_i W_i x_i + B h     the base's own all-reduce (reduce-scatter under SP) carries W
  SP off: dy is complete everywhere, so dB = dy hᵀ is complete and identical on every rank.
  SP on: the output is a sequence shard; h is split along the sequence before B, so dB_i
  covers this rank's tokens only. B is marked ``sequence_parallel`` and its gradient summed
  over TP once per step (megatron's finalize_model_grads, or
  :func:`dist_lora.parallel.grads.allreduce_sequence_parallel_grads`), as megatron does for
  its sequence-parallel norm weights.

This is the straightforward design: one r-sized collective per LoRA path per pass.
"""

from __future__ import annotations

import contextlib

import torch

from ..parallel import tp
from . import math as lm
from .base import LoraLayer


def _mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


class _ParallelLoraLayer(LoraLayer):
    def __init__(self, base_layer: torch.nn.Module) -> None:
        super().__init__(base_layer, base_layer.input_size, base_layer.output_size)
        self.tp_group = tp.tp_group_of(base_layer)
        self.tp_rank, self.tp_size = tp.group_rank_size(self.tp_group)
        # Factors are split exactly like the base weight, including megatron's strided
        # split of a gated fc1 ([gate; up] per shard), so a full factor means the same
        # thing at every TP size.
        self.stride = tp.partition_stride(base_layer.weight)

    @property
    def sequence_parallel(self) -> bool:
        return bool(getattr(self.base_layer, "sequence_parallel", False)) and self.tp_size > 1


class LoraColumnParallelLinear(_ParallelLoraLayer):
    """LoRA on a ColumnParallelLinear: A replicated, B sharded like the base rows."""

    def shard_b(self, b: torch.Tensor) -> torch.Tensor:
        return tp.shard(b, 0, self.tp_rank, self.tp_size, self.stride)

    def _tag_parameters(self, adapter_name: str) -> None:
        for param in self.lora_B[adapter_name].parameters():
            tp.set_tp_attributes(param, 0, self.stride)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, out_bias = self.base_layer(x, *args, **kwargs)
        adapters = self._forward_adapters()
        if not adapters:
            return out, out_bias
        m = _mappings()
        group = self.tp_group
        if self.sequence_parallel:
            x = m.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
        gather = kwargs.get("runtime_gather_output")
        gather = self.base_layer.gather_output if gather is None else gather
        for name in adapters:
            lora_b = self.lora_B[name]
            h = lm.lora_down(x, self.lora_A[name].weight, self.scaling[name], self.lora_dropout[name])
            h = m.copy_to_tensor_model_parallel_region(h, group=group)
            y = lm.lora_up(h, lora_b.weight, lora_b.bias, self.scaling[name])
            if gather:
                y = m.gather_from_tensor_model_parallel_region(y, group=group)
            out = out + y.to(out.dtype)
        return out, out_bias


class LoraRowParallelLinear(_ParallelLoraLayer):
    """LoRA on a RowParallelLinear: A sharded like the base columns, B replicated."""

    def shard_a(self, a: torch.Tensor) -> torch.Tensor:
        return tp.shard(a, 1, self.tp_rank, self.tp_size, self.stride)

    def _tag_parameters(self, adapter_name: str) -> None:
        tp.set_tp_attributes(self.lora_A[adapter_name].weight, 1, self.stride)
        if self.sequence_parallel:
            for param in self.lora_B[adapter_name].parameters():
                tp.mark_sequence_parallel(param)

    def _sharded_dropout_rng(self, dropout: torch.nn.Module):
        """Dropout on a feature shard draws from megatron's model-parallel RNG stream
        (different on each TP rank), like megatron's own dropout on sharded activations."""
        if not (self.training and isinstance(dropout, torch.nn.Dropout) and self.tp_size > 1):
            return contextlib.nullcontext()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        return tracker.fork() if tracker.is_initialized() else contextlib.nullcontext()

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, out_bias = self.base_layer(x, *args, **kwargs)
        adapters = self._forward_adapters()
        if not adapters:
            return out, out_bias
        m = _mappings()
        group = self.tp_group
        if not self.base_layer.input_is_parallel:
            x = m.scatter_to_tensor_model_parallel_region(x, group=group)
        for name in adapters:
            lora_b, dropout = self.lora_B[name], self.lora_dropout[name]
            with self._sharded_dropout_rng(dropout):
                h = lm.lora_down(x, self.lora_A[name].weight, self.scaling[name], dropout)
            h = m.reduce_from_tensor_model_parallel_region(h, group=group)
            if self.sequence_parallel:
                h = m.scatter_to_sequence_parallel_region(h, group=group)
            out = out + lm.lora_up(h, lora_b.weight, lora_b.bias, self.scaling[name]).to(out.dtype)
        return out, out_bias
