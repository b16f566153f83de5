"""Once-per-step gradient synchronisation of replicated adapter factors.

Under sequence parallelism some replicated parameters (the B factor of a row-parallel LoRA
layer, like megatron's norm weights) get a gradient from this rank's tokens only. They carry
``param.sequence_parallel = True``; megatron's ``finalize_model_grads`` sums them over TP,
and so does :func:`allreduce_sequence_parallel_grads` for users with their own training loop:
one flattened all-reduce per step for all of them, never one per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def sequence_parallel_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        p.grad
        for p in model.parameters()
        if p.requires_grad and p.grad is not None and getattr(p, "sequence_parallel", False)
    ]


def allreduce_sequence_parallel_grads(model: torch.nn.Module, group: Optional[dist.ProcessGroup] = None) -> int:
    """Sum the gradients of ``sequence_parallel`` parameters over the TP group in one
    collective; returns how many tensors were reduced. Call after backward, before the
    optimizer step (and before gradient clipping)."""
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    grads = sequence_parallel_grads(model)
    if not grads or dist.get_world_size(group) == 1:
        return 0
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)
    return len(grads)
