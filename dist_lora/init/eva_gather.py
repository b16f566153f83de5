"""Where a target layer's input lives under tensor/sequence/data parallelism, and how EVA
brings it to the one rank that runs the layer's PCA (its *owner*).

Layouts of a layer input on one rank (t = TP size, d = DP size; ``x`` is [tokens, features]
after masking):
  "replicated"  every TP rank holds the same x [n, in]: plain layers, column-parallel layers
                with SP off, row-parallel layers with ``input_is_parallel=False``.
  "sequence"    TP rank i holds its contiguous 1/t of the sequence, all features: the input of
                a column-parallel layer under sequence parallelism ([s/t, b, in] in megatron).
                These are TOKENS: gathered by concatenating rows, in TP-rank order, which is
                the order of the full sequence.
  "feature"     TP rank i holds every token of the replica and feature shard i [n, in/t]: the
                input of a row-parallel layer (``input_is_parallel``). These are FEATURES:
                gathered by concatenating columns (PEFT's EVA concatenates them as if they
                were more tokens, which is wrong).
Data-parallel ranks hold different tokens (and different counts: masks differ), gathered by
rows.

Gather to the owner (TP rank t_o, DP rank d_o), two steps; token counts differ per rank, so
each step all-gathers the counts (8 bytes per rank), pads to the largest and cuts again:
  1. within each TP group ("sequence"/"feature" only): ``gather`` to TP rank t_o.
  2. among the ranks of TP rank t_o (one megatron DP group): ``gather`` to DP rank d_o.
Bytes per layer and batch (fp32, N the replica's masked tokens, D = in_features), received by:
  step 1  each replica's TP rank t_o:  (t-1)/t · N·D·4   ("feature": exactly; "sequence": the
          other ranks' tokens, padded to the largest count)
  step 2  the owner:                    (d-1) · N_max·D·4   (N_max the largest replica count)
so the owner receives the layer's global input matrix once and no other rank receives more
than its replica's. PEFT all-gathers over the whole world instead: every rank receives
(world-1) · N·D_local·4 bytes for every layer, and every rank runs every PCA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..layers.parallel import LoraColumnParallelLinear, LoraRowParallelLinear

LAYOUTS = ("replicated", "sequence", "feature")


@dataclass(frozen=True)
class Topology:
    """This rank's TP and DP groups (None: size 1) and its ranks in them."""

    tp_group: Optional[dist.ProcessGroup] = None
    tp_rank: int = 0
    tp_size: int = 1
    dp_group: Optional[dist.ProcessGroup] = None
    dp_rank: int = 0
    dp_size: int = 1
    reduce_group: Optional[dist.ProcessGroup] = None  # all ranks sharing the PCA results: TP×DP

    @property
    def slots(self) -> int:
        """The ranks PCA work is divided among: TP × DP."""
        return self.tp_size * self.dp_size

    def slot(self, index: int) -> tuple[int, int]:
        """(TP rank, DP rank) of work slot ``index``."""
        return index % self.tp_size, index // self.tp_size

    def owns(self, slot: tuple[int, int]) -> bool:
        return slot == (self.tp_rank, self.dp_rank)


def current_topology(gather_data_parallel: bool = True) -> Topology:
    """megatron's TP and DP groups when its parallel state exists; else, under
    torch.distributed, WORLD as the DP group (e.g. an HF model under torchrun); else none.
    ``gather_data_parallel=False`` (every DP rank reads the same data) drops the DP group."""
    if not (dist.is_available() and dist.is_initialized()):
        return Topology()
    tp_group = dp_group = None
    try:
        from megatron.core import parallel_state

        megatron = parallel_state.model_parallel_is_initialized()
    except ImportError:
        megatron = False
    if megatron:
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError(
                "computing EVA under pipeline parallelism is not supported: compute the EVA state dict at PP=1 "
                "(it is layout-independent, keyed by global module names) and load it at any layout with "
                "initialize_lora_eva_weights(model, eva_state_dict=...)."
            )
        tp_group = parallel_state.get_tensor_model_parallel_group()
        dp_group = parallel_state.get_data_parallel_group()
    else:
        dp_group = dist.group.WORLD
    tp_rank, tp_size = _rank_size(tp_group)
    dp_rank, dp_size = _rank_size(dp_group)
    if tp_size * dp_size != dist.get_world_size():
        raise NotImplementedError(
            f"EVA needs the world ({dist.get_world_size()} ranks) to be TP ({tp_size}) x DP ({dp_size}); "
            "context or expert parallelism is not supported."
        )
    reduce_group = dist.group.WORLD
    if not gather_data_parallel:  # every DP replica reads the same data and computes alone
        dp_group, dp_rank, dp_size = None, 0, 1
        reduce_group = tp_group
    return Topology(tp_group, tp_rank, tp_size, dp_group, dp_rank, dp_size, reduce_group)


def _rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def layer_layout(layer: torch.nn.Module) -> str:
    """The layout (see the module docstring) of a LoRA layer's input."""
    if isinstance(layer, LoraColumnParallelLinear) and layer.sequence_parallel:
        return "sequence"
    if isinstance(layer, LoraRowParallelLinear) and layer.tp_size > 1 and layer.base_layer.input_is_parallel:
        if layer.stride != 1:
            raise NotImplementedError("EVA on a row-parallel layer with a strided input split is not supported.")
        return "feature"
    return "replicated"


def _gather(x: torch.Tensor, group: dist.ProcessGroup, dst: int, dim: int) -> Optional[torch.Tensor]:
    """Concatenate every group rank's ``x`` along ``dim`` (0: rows, any counts; 1: columns,
    equal row counts) on group rank ``dst``; None on the other ranks."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(size)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c.item()) for c in counts]
    if dim == 1 and len(set(counts)) > 1:
        raise ValueError(
            f"tensor-parallel ranks selected different numbers of tokens {counts} for a row-parallel layer's "
            "input: the mask (prepare_model_inputs_fn / prepare_layer_inputs_fn) must be the same on every TP rank."
        )
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)] if me == dst else None
    dist.gather(padded.contiguous(), parts, dst=dist.get_global_rank(group, dst), group=group)
    if me != dst:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=dim)


def gather_to_owner(x: torch.Tensor, layout: str, topo: Topology, owner: tuple[int, int]) -> Optional[torch.Tensor]:
    """The layer's input over all TP and DP ranks, [N_global, in_features], on the owner rank;
    None elsewhere. Every rank of the TP×DP world must call this for the layer (ranks with
    nothing to send return early without a collective where none is needed)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    tp_dst, dp_dst = owner
    if layout != "replicated" and topo.tp_size > 1:
        x = _gather(x, topo.tp_group, tp_dst, dim=0 if layout == "sequence" else 1)
    if topo.tp_rank != tp_dst:
        return None
    if topo.dp_size > 1:
        x = _gather(x, topo.dp_group, dp_dst, dim=0)
    return x if topo.owns(owner) else None
