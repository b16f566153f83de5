"""LoRA on megatron-core's VocabParallelEmbedding (the token embedding of a GPTModel).

The base weight E [V, d] is split by vocabulary rows over TP: rank i holds rows V_i and looks
up only the tokens in its range (the others read row 0 and are zeroed), then the partial
outputs are summed by one all-reduce (a reduce-scatter along the sequence under sequence
parallelism). The adapter y = E[x] + s · Aᵀ[x] Bᵀ (see :mod:`dist_lora.layers.embedding`)
is split the same way:

    Aᵀ [V, r] is split with the vocabulary, so A_i = columns V_i of A;   B [d, r] replicated.

    forward   y = Σ_i mask_i ⊙ (E_i[x - start_i] + s · A_iᵀ[x - start_i] Bᵀ)
                  the LoRA term is added to the partial output BEFORE the base's one
                  all-reduce (reduce-scatter), which then carries it: no extra collective.
    backward  dy is complete on every rank (the all-reduce's backward is the identity; under
              SP the reduce-scatter's is an all-gather, the base's own);
              dA_i = s · (dy B)ᵀ gathered into the columns of this rank's tokens: local, complete;
              dB = Σ_i s · dyᵀ A_iᵀ[x]: a partial sum per rank, summed over TP once per step
              with the other replicated factors (:func:`dist_lora.parallel.grads.finalize_lora_grads`,
              which finds dB by its ``tp_partial_grad`` tag, set in ``_tag_parameters``).

The wrapper therefore re-implements ``VocabParallelEmbedding.forward`` with megatron's own
mapping functions (the same mask, lookup and collective); with no active adapter it calls the
base layer as is. DoRA: m [d] is replicated; its norm ||E + ΔE|| over the vocabulary is a sum
over the shards (one d-sized all-reduce per forward, as for a row-parallel DoRA layer) and
dm is a partial sum, summed per step like dB. Factors are drawn in full from one seed and
sliced, so the adapter is the same at every TP size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..parallel import grads, tp
from .embedding import LoraEmbedding


class LoraVocabParallelEmbedding(LoraEmbedding):
    """LoRA on a VocabParallelEmbedding: A split with the vocabulary rows, B replicated."""

    def __init__(self, base_layer: torch.nn.Module) -> None:
        super().__init__(base_layer)
        self.tp_group = tp.tp_group_of(base_layer)
        self.tp_rank, self.tp_size = tp.group_rank_size(self.tp_group)

    def shard_a(self, a: torch.Tensor) -> torch.Tensor:
        return tp.shard(a, 1, self.tp_rank, self.tp_size)

    def _tag_parameters(self, adapter_name: str) -> None:
        tp.set_tp_attributes(self.lora_A[adapter_name].weight, 1)
        grads.mark_tp_partial_grads(self.adapter_parameters(), self._partial_grad_parameters())

    def _reduce_norm_sq(self, norm_sq: torch.Tensor) -> torch.Tensor:
        """||E + ΔE||² per embedding column = Σ_i over the vocabulary shards (one d-sized all-reduce)."""
        if self.tp_size > 1:
            dist.all_reduce(norm_sq, group=self.tp_group)
        return norm_sq

    def _partial_grad_parameters(self) -> list[torch.nn.Parameter]:
        """B (and DoRA's m): replicated, with a per-rank partial gradient (summed once per step)."""
        if self.tp_size == 1:
            return []
        params = [self.lora_B[n].weight for n in self.lora_B]
        return params + [self.lora_magnitude_vector[n].weight for n in self.lora_magnitude_vector]

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of a local table, as the base layer looks them up."""
        if getattr(self.base_layer, "deterministic_mode", False):
            return table[ids]
        return torch.nn.functional.embedding(ids, table)

    def _local_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(ids shifted into this rank's vocabulary range with outside ids set to 0, the mask
        of outside ids or None at TP=1): megatron's masking."""
        if self.tp_size == 1:
            return ids, None
        base = self.base_layer
        outside = (ids < base.vocab_start_index) | (ids >= base.vocab_end_index)
        local = ids.clone() - base.vocab_start_index
        local[outside] = 0
        return local, outside

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The base layer's one collective: all-reduce, or (SP) [b, s, h] -> [s, b, h] and reduce-scatter."""
        from megatron.core.tensor_parallel import mappings

        base = self.base_layer
        if base.reduce_scatter_embeddings:
            partial = partial.transpose(0, 1).contiguous()
            return mappings.reduce_scatter_to_sequence_parallel_region(partial, group=base.tp_group)
        return mappings.reduce_from_tensor_model_parallel_region(partial, group=base.tp_group)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        adapters = self._forward_adapters()
        if not adapters:
            return self.base_layer(input_)
        ids, outside = self._local_ids(input_)
        out = self._add_adapters(self._lookup(ids, self.base_layer.weight), ids, adapters)
        if outside is not None:
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self._reduce(out)
