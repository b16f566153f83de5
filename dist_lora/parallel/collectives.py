"""Collectives that are no-ops where there is nothing to communicate.

Every function takes a process group that may be ``None``, have one rank, or belong to a
job where ``torch.distributed`` was never initialised; then the input comes back as it is
(or as a one-element list). This lets the same code serve one process and any TP/DP layout.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def communicates(group: Optional[dist.ProcessGroup]) -> bool:
    """Whether ``group`` has more than one rank in an initialised process group."""
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1


def broadcast_from_first(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """In place: every rank gets the group's first rank's ``tensor``."""
    if communicates(group):
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor


def all_reduce(tensor: torch.Tensor, group: Optional[dist.ProcessGroup], op=None) -> torch.Tensor:
    """In place, SUM unless ``op`` says otherwise."""
    if communicates(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all), in group rank order."""
    if not communicates(group):
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def all_gather_object(obj: Any, group: Optional[dist.ProcessGroup]) -> list[Any]:
    """Every rank's picklable ``obj``, in group rank order."""
    if not communicates(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def data_parallel_group() -> Optional[dist.ProcessGroup]:
    """megatron's data-parallel group when megatron's state exists, else the whole world
    (plain data parallelism, e.g. DeepSpeed on an HF model); None when there is one replica."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_data_parallel_group()
            return group if communicates(group) else None
    except ImportError:
        pass
    return dist.group.WORLD if communicates(dist.group.WORLD) else None


def world() -> Optional[dist.ProcessGroup]:
    """The whole job's group, or None in a single process."""
    return dist.group.WORLD if dist.is_initialized() else None


def raise_together(error: Optional[BaseException], group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise on every rank of ``group`` (default: the world) when any rank has an ``error``:
    the first failing rank's ValueError, named, so that no rank goes on into a collective that
    the failed ones never reach. A no-op when no rank failed."""
    group = world() if group is None else group
    messages = all_gather_object(None if error is None else str(error), group)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if isinstance(error, ValueError):
        raise error
    rank, message = failed[0]
    raise ValueError(f"rank {rank}: {message}" if len(messages) > 1 else message)
