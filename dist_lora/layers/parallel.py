"""LoRA on megatron-core's ColumnParallelLinear and RowParallelLinear.

Factors are split like the base weight (TP ranks i, s the scale):
  column-parallel base (W_i = rows of W):    A replicated,          B_i = rows i of B
  row-parallel base    (W_i = columns of W): A_i = columns i of A,  B replicated

Two implementations of the communication, chosen per layer by ``tp_comm``:

"fused" (default, :mod:`dist_lora.layers.fused`): the LoRA path rides on the base layer's own
  collective in forward and backward, so the layer does exactly the collectives of the frozen
  base. The replicated factor's gradient (column A, row B) is then a per-rank partial sum,
  summed over TP once per step for all layers by :func:`dist_lora.parallel.grads.finalize_lora_grads`,
  which finds such parameters by their ``tp_partial_grad`` tag (set here, see ``_tag_partial_grads``).

"reference" (PEFT's design, kept to check the fused path against): the base layer runs as is
  and the LoRA path adds one r-sized collective of its own per pass.
    Column: h = s·A x is identical on every rank; ``copy_to_tensor_model_parallel_region(h)``
      all-reduces dh = Σ_i B_iᵀ dy_i in backward, after which dA and the LoRA part of dx are
      complete on every rank. Under SP the LoRA path all-gathers the sequence itself and its
      backward keeps this rank's chunk (the gradient is already complete).
    Row: h = Σ_i s·A_i x_i by one r-sized all-reduce; y = base + B h. SP off: dB is complete.
      SP on: h is split along the sequence before B, so dB covers this rank's tokens only and
      is summed per step like the fused path's partial gradients.

Experts (megatron's expert linears, built with ``is_expert=True``): their TP group is the
expert-TP group, and the base layer does no collective of its own (``explicit_expert_comm``):
the token dispatcher all-gathers the expert's tokens over expert-TP before fc1 and
reduce-scatters fc2's partial output after it, and their backwards carry the input gradient.
So an expert's LoRA path is the fused one with no collective at all: column y_i = W_i x +
B_i h (dx partial, summed by the dispatcher), row y_partial = W_i x_i + B h_i (summed by the
dispatcher); the replicated factor's gradient (column A, row B) is a partial sum over
expert-TP, summed per step over that group (:mod:`dist_lora.parallel.grads`, which finds expert
parameters by ``is_expert``). The reference path would add its own r-sized all-reduce on top of
the dispatcher's and count the LoRA term expert-TP times, so it (and DoRA, which uses it) is
refused on experts at expert-TP > 1.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..factors import weight_driven as wd
from ..parallel import grads, tp
from . import math as lm
from .base import LoraLayer
from .fused import ColumnParallelLoRA, FusedSpec, RowParallelLoRA

TP_COMM_MODES = ("fused", "reference")


def _mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


class ParallelLoraLayer(LoraLayer):
    """What the column- and row-parallel LoRA layers share: the TP group, the communication mode,
    and the ``tp_partial_grad`` tags of the replicated factors."""

    def __init__(self, base_layer: torch.nn.Module, tp_comm: str = "fused", keep_gathered_input: bool = False) -> None:
        super().__init__(base_layer, base_layer.input_size, base_layer.output_size)
        self.tp_group = tp.tp_group_of(base_layer)  # an expert's: the expert-TP group
        self.tp_rank, self.tp_size = tp.group_rank_size(self.tp_group)
        self.is_expert = bool(getattr(base_layer, "is_expert", False))
        # Factors are split exactly like the base weight, including megatron's strided
        # split of a gated fc1 ([gate; up] per shard), so a full factor means the same
        # thing at every TP size.
        self.stride = tp.partition_stride(base_layer.weight)
        self.set_tp_comm(tp_comm, keep_gathered_input)

    _layout = "column"

    def _weight_driven_factors(
        self, weight: torch.Tensor, r: int, scaling: float, init: str, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PiSSA / OLoRA from the shards: Gram-eigh / TSQR over TP (never the full weight on a
        rank), the same algorithm at every TP size; see :mod:`dist_lora.factors.weight_driven`."""
        return wd.sharded_weight_driven_factors(
            weight, r, scaling, init, self._layout, self.tp_group, self.tp_rank, self.stride
        )

    def _shard_info(self) -> dict:
        return dict(layout=self._layout, group=self.tp_group, rank=self.tp_rank, size=self.tp_size, stride=self.stride)

    def set_tp_comm(self, mode: str, keep_gathered_input: bool = False) -> None:
        """Choose the communication: "fused" (default) or "reference"; see the module docstring.
        ``keep_gathered_input`` (fused, SP on): keep the gathered input for dA instead of
        re-gathering it in backward."""
        if mode not in TP_COMM_MODES:
            raise ValueError(f"tp_comm must be one of {TP_COMM_MODES}, got {mode!r}.")
        if mode != "fused" and self.is_expert and self.tp_size > 1:
            raise NotImplementedError(
                f"tp_comm={mode!r} is not supported on MoE experts at expert-TP > 1 (their collectives belong to the "
                "token dispatcher); use runtime_config.tp_comm='fused'."
            )
        self.tp_comm = mode
        self.keep_gathered_input = keep_gathered_input
        self._tag_partial_grads()  # the mode decides which gradients are partial sums

    @property
    def sequence_parallel(self) -> bool:
        """Whether the base layer gathers / scatters the sequence (never an expert's: its
        tokens come from the dispatcher)."""
        return bool(getattr(self.base_layer, "sequence_parallel", False)) and self.tp_size > 1 and not self.is_expert

    def _tag_parameters(self, adapter_name: str) -> None:
        if self.is_expert and self.tp_size > 1 and (self.lora_magnitude_vector or self.lora_B[adapter_name].bias is not None):
            raise NotImplementedError(
                "use_dora and lora_bias are not supported on MoE experts at expert-TP > 1; target the experts "
                "without them, or use expert_tensor_parallel_size=1."
            )
        self._tag_sharded(adapter_name)
        self._tag_partial_grads()  # a DoRA adapter changes the path (so the partial sums) of every adapter
        if self.is_expert:
            grads.mark_expert_parameters(self.adapter_parameters())

    def _tag_sharded(self, adapter_name: str) -> None:
        """TP attributes of the new adapter's sharded parameters."""

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._tag_partial_grads()  # without its last DoRA adapter the layer takes the fused path again

    def _partial_grad_parameters(self) -> list[torch.nn.Parameter]:
        """Replicated adapter parameters whose gradient on each rank is a partial sum over TP
        (summed once per step by finalize_lora_grads)."""
        return []

    def _tag_partial_grads(self) -> None:
        """Set ``tp_partial_grad`` on every adapter parameter from :meth:`_partial_grad_parameters`."""
        grads.mark_tp_partial_grads(self.adapter_parameters(), self._partial_grad_parameters())

    def _can_fuse(self, x: torch.Tensor, adapters: list[str]) -> bool:
        base = self.base_layer
        return (
            self.tp_comm == "fused"
            and not base.weight.requires_grad
            and not self.lora_magnitude_vector  # DoRA layers take the reference path
            and x.dtype == base.weight.dtype  # adapters compute in it (lm.in_compute_dtype)
            and (self.is_expert or not getattr(base, "explicit_expert_comm", False))
            and not getattr(base, "disable_grad_reduce", False)
        )

    def _uses_fused(self) -> bool:
        """Whether forward takes the fused path (decides which gradients are partial sums)."""
        return self.tp_comm == "fused" and not self.lora_magnitude_vector

    def _dora_input(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
        """(dropout(x), whether dropout was applied) for a DoRA adapter."""
        dropout = self.lora_dropout[name]
        if self.training and isinstance(dropout, torch.nn.Dropout):
            return dropout(x), True
        return x, False

    def _base_nobias(self, base_out: torch.Tensor) -> torch.Tensor:
        """The base output without the bias megatron added to it (none with skip_bias_add)."""
        base = self.base_layer
        if base.bias is None or base.skip_bias_add:
            return base_out
        return base_out - base.bias

    def _spec(self, adapters: list[str]) -> FusedSpec:
        return FusedSpec(
            group=self.tp_group,
            tp_size=1 if self.is_expert else self.tp_size,  # an expert's collectives are the dispatcher's
            sequence_parallel=self.sequence_parallel,
            scalings=tuple(self.scaling[n] for n in adapters),
            keep_gathered_input=self.keep_gathered_input,
        )



class LoraColumnParallelLinear(ParallelLoraLayer):
    """LoRA on a ColumnParallelLinear: A replicated, B sharded like the base rows.

    The input is replicated over TP (or its gathered sequence is), so dropout draws the same
    mask on every TP rank from the default generator, which megatron seeds alike across TP.
    """

    def shard_b(self, b: torch.Tensor) -> torch.Tensor:
        return tp.shard(b, 0, self.tp_rank, self.tp_size, self.stride)

    def _tag_sharded(self, adapter_name: str) -> None:
        for param in self.lora_B[adapter_name].parameters():
            tp.set_tp_attributes(param, 0, self.stride)
        if adapter_name in self.lora_magnitude_vector:  # m is sharded with the output rows
            tp.set_tp_attributes(self.lora_magnitude_vector[adapter_name].weight, 0, self.stride)

    def _partial_grad_parameters(self) -> list[torch.nn.Parameter]:
        if self.tp_size == 1 or not self._uses_fused():
            return []
        return [self.lora_A[n].weight for n in self.lora_A]

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None, runtime_gather_output: Optional[bool] = None):
        base = self.base_layer
        adapters = self._forward_adapters()
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if adapters and self._can_fuse(x, adapters):
            return self._forward_fused(x, adapters, base.weight if weight is None else weight, gather)
        kwargs = {} if weight is None else {"weight": weight}
        if runtime_gather_output is not None:
            kwargs["runtime_gather_output"] = runtime_gather_output
        out, out_bias = base(x, **kwargs)
        if adapters:
            w = base.weight if weight is None else weight
            out = self._add_reference(out, x, adapters, gather, w)
        return out, out_bias

    def _forward_fused(self, x: torch.Tensor, adapters: list[str], weight: torch.Tensor, gather: bool):
        base = self.base_layer
        full_shape = (x.shape[0] * self.tp_size, *x.shape[1:]) if self.sequence_parallel else x.shape
        factors = []
        for name in adapters:
            lora_b = self.lora_B[name]
            factors += [*(lm.in_compute_dtype(f, x) for f in (self.lora_A[name].weight, lora_b.weight, lora_b.bias)),
                        self._dropout_mask(name, full_shape, x)]
        bias = None if base.skip_bias_add else base.bias
        out = ColumnParallelLoRA.apply(x, weight, bias, self._spec(adapters), *factors)
        if gather:
            out = _mappings().gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, (base.bias if base.skip_bias_add else None)

    def _add_reference(
        self, out: torch.Tensor, x: torch.Tensor, adapters: list[str], gather: bool, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        m, group = _mappings(), self.tp_group
        base_out = out
        if self.sequence_parallel:
            x = m.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)
        for name in adapters:
            lora_b = self.lora_B[name]
            dora = self.is_dora(name)
            if dora:
                if gather:
                    raise NotImplementedError("DoRA on a ColumnParallelLinear with gather_output=True is not supported.")
                x_d, dropped = self._dora_input(x, name)
                h = lm.lora_down(x_d, self.lora_A[name].weight, self.scaling[name], torch.nn.Identity())
            else:
                h = lm.lora_down(x, self.lora_A[name].weight, self.scaling[name], self.lora_dropout[name])
            h = m.copy_to_tensor_model_parallel_region(h, group=group)
            y = lm.lora_up(h, lora_b.weight, lora_b.bias, self.scaling[name])
            if dora:
                # m_i / n_i on this rank's rows: a column shard holds whole rows, the norm is local.
                if dropped:  # W_i x_d: dx is a partial sum over TP, all-reduced by the copy
                    x_c = m.copy_to_tensor_model_parallel_region(x_d, group=group)
                    base_nobias = torch.nn.functional.linear(x_c.to(weight.dtype), weight)
                else:
                    base_nobias = self._base_nobias(base_out)
                y = lm.dora_output(base_nobias, y, self._dora_scale(name))
            if gather:
                y = m.gather_from_tensor_model_parallel_region(y, group=group)
            out = out + y.to(out.dtype)
        return out


class LoraRowParallelLinear(ParallelLoraLayer):
    """LoRA on a RowParallelLinear: A sharded like the base columns, B replicated.

    The input is a feature shard, so dropout draws from megatron's model-parallel RNG stream
    (different on each TP rank), as megatron does for its own sharded activations.
    """

    _layout = "row"

    def shard_a(self, a: torch.Tensor) -> torch.Tensor:
        return tp.shard(a, 1, self.tp_rank, self.tp_size, self.stride)

    def _tag_sharded(self, adapter_name: str) -> None:
        tp.set_tp_attributes(self.lora_A[adapter_name].weight, 1, self.stride)

    def _reduce_norm_sq(self, norm_sq: torch.Tensor) -> torch.Tensor:
        """||W + ΔW||²_row = Σ_i ||W_i + s·B·A_i||²_row: one out-sized all-reduce over TP."""
        if self.tp_size > 1:
            torch.distributed.all_reduce(norm_sq, group=self.tp_group)
        return norm_sq

    def _partial_grad_parameters(self) -> list[torch.nn.Parameter]:
        if self.tp_size == 1 or (not self._uses_fused() and not self.sequence_parallel):
            return []
        if not self._uses_fused():  # reference path under SP: B and m see this rank's tokens only
            return [p for n in self.lora_B for p in self.lora_B[n].parameters()] + [
                self.lora_magnitude_vector[n].weight for n in self.lora_magnitude_vector
            ]
        params = [self.lora_B[n].weight for n in self.lora_B]
        if self.sequence_parallel:  # the LoRA bias is added to this rank's sequence shard
            params += [self.lora_B[n].bias for n in self.lora_B if self.lora_B[n].bias is not None]
        return params

    def _sharded_rng(self):
        if not (self.training and self.tp_size > 1):
            return contextlib.nullcontext()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        return tracker.fork() if tracker.is_initialized() else contextlib.nullcontext()

    def forward(self, x: torch.Tensor):
        base = self.base_layer
        adapters = self._forward_adapters()
        if adapters and self._can_fuse(x, adapters):
            return self._forward_fused(x, adapters)
        out, out_bias = base(x)
        if adapters:
            out = self._add_reference(out, x, adapters)
        return out, out_bias

    def _forward_fused(self, x: torch.Tensor, adapters: list[str]):
        base = self.base_layer
        if not base.input_is_parallel:
            x = _mappings().scatter_to_tensor_model_parallel_region(x, group=self.tp_group)
        factors = []
        with self._sharded_rng():
            for name in adapters:
                factors += [lm.in_compute_dtype(self.lora_A[name].weight, x), lm.in_compute_dtype(self.lora_B[name].weight, x),
                            None, self._dropout_mask(name, x.shape, x)]
        out = RowParallelLoRA.apply(x, base.weight, self._spec(adapters), *factors)
        for name in adapters:
            bias = self.lora_B[name].bias
            if bias is not None:
                out = out + lm.scaled_bias(bias, self.scaling[name])
        if base.skip_bias_add:
            return out, base.bias
        return (out if base.bias is None else out + base.bias), None

    def _add_reference(self, out: torch.Tensor, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        m, group = _mappings(), self.tp_group
        base_out = out
        if not self.base_layer.input_is_parallel:
            x = m.scatter_to_tensor_model_parallel_region(x, group=group)
        for name in adapters:
            lora_b, dropout = self.lora_B[name], self.lora_dropout[name]
            dora, dropped, x_d = self.is_dora(name), False, x
            with self._sharded_rng() if isinstance(dropout, torch.nn.Dropout) else contextlib.nullcontext():
                if dora:
                    x_d, dropped = self._dora_input(x, name)
                    h = lm.lora_down(x_d, self.lora_A[name].weight, self.scaling[name], torch.nn.Identity())
                else:
                    h = lm.lora_down(x, self.lora_A[name].weight, self.scaling[name], dropout)
            h = m.reduce_from_tensor_model_parallel_region(h, group=group)
            if self.sequence_parallel:
                h = m.scatter_to_sequence_parallel_region(h, group=group)
            y = lm.lora_up(h, lora_b.weight, lora_b.bias, self.scaling[name])
            if dora:  # m replicated; the norm is all-reduced over TP (see _reduce_norm_sq)
                if dropped:  # Σ_i W_i x_d,i, reduced like the base output
                    partial = torch.nn.functional.linear(x_d.to(self.base_layer.weight.dtype), self.base_layer.weight)
                    if self.sequence_parallel:
                        base_nobias = m.reduce_scatter_to_sequence_parallel_region(partial, group=group)
                    else:
                        base_nobias = m.reduce_from_tensor_model_parallel_region(partial, group=group)
                else:
                    base_nobias = self._base_nobias(base_out)
                y = lm.dora_output(base_nobias, y, self._dora_scale(name))
            out = out + y.to(out.dtype)
        return out
