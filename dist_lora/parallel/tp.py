"""Tensor-parallel helpers: the group of a megatron layer, ranks, and shard slicing."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def tp_group_of(layer: torch.nn.Module) -> Optional[dist.ProcessGroup]:
    """The tensor-parallel group a megatron parallel linear layer was built with."""
    group = getattr(layer, "tp_group", None)
    if group is not None:
        return group
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def group_rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard(tensor: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """This rank's part of a full tensor along ``dim``, as megatron splits its master weights.

    The full dimension is cut into ``size * stride`` equal chunks and rank i keeps chunks
    i, i + size, i + 2·size, ... With stride 1 that is one contiguous block; a gated MLP's
    fc1 ([gate; up], stride 2) gives each rank [gate_i; up_i].
    """
    if tensor.shape[dim] % (size * stride):
        raise ValueError(
            f"dimension {dim} of size {tensor.shape[dim]} does not divide into {size} TP shards (stride {stride})."
        )
    chunks = tensor.chunk(size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim).contiguous()


def set_tp_attributes(param: torch.nn.Parameter, partition_dim: int, stride: int = 1) -> None:
    """Megatron's markers for a tensor-parallel-sharded parameter (read by its checkpointing)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def partition_stride(param: torch.Tensor) -> int:
    return int(getattr(param, "partition_stride", 1) or 1)


def gather_full(tensor: torch.Tensor, dim: int, group: Optional[dist.ProcessGroup], stride: int = 1) -> torch.Tensor:
    """The full tensor from every rank's :func:`shard` along ``dim`` (its inverse): all-gather
    the shards over ``group``, then put the strided pieces back in order (piece k of every
    rank, for k = 0 .. stride-1)."""
    rank, size = group_rank_size(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    pieces = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([p[k] for k in range(stride) for p in pieces], dim=dim)
