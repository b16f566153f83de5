"""Once-per-step gradient synchronisation of replicated adapter factors.

Some replicated parameters get a per-rank partial gradient that must be summed over TP before
the optimizer step: the replicated factor of every fused parallel LoRA layer (column A, row B;
see :mod:`dist_lora.layers.fused`) and of a vocab-parallel embedding (B, see
:mod:`dist_lora.layers.parallel_embedding`), the row B of the reference path under sequence
parallelism, and any trainable parameter megatron marks ``sequence_parallel`` (its norm
weights under SP). :func:`finalize_lora_grads` sums all of them in one flattened all-reduce
per step — never one collective per layer.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def tp_partial_grad_parameters(model: torch.nn.Module, include_sequence_parallel: bool = True) -> list[torch.nn.Parameter]:
    """Trainable parameters whose gradient is a per-rank partial sum over TP: the LoRA
    layers' replicated factors, and (``include_sequence_parallel``) parameters megatron marks
    ``sequence_parallel``."""
    from ..layers.base import LoraLayer

    params: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        partial = getattr(module, "partial_grad_parameters", None)  # parallel linear and embedding layers
        if isinstance(module, LoraLayer) and partial is not None:
            params.update((id(p), p) for p in partial())
    if include_sequence_parallel:
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False):
                params[id(p)] = p
    return [p for p in params.values() if p.requires_grad]


def _grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient as the training loop keeps it: megatron's DDP accumulates into ``main_grad``."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


def finalize_lora_grads(
    model: torch.nn.Module, group: Optional[dist.ProcessGroup] = None, include_sequence_parallel: bool = True
) -> int:
    """Sum the partial gradients over the TP group in one collective; returns how many tensors
    were reduced. Call after backward (and gradient accumulation), before clipping and the
    optimizer step. Every TP rank must call it. With megatron's own finalize_model_grads
    (which already sums ``sequence_parallel`` parameters) use
    :func:`make_finalize_model_grads_func` instead."""
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return 0
    grads = [g for g in map(_grad, tp_partial_grad_parameters(model, include_sequence_parallel)) if g is not None]
    if not grads:
        return 0
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)
    return len(grads)


def make_finalize_model_grads_func(inner: Optional[Callable] = None) -> Callable:
    """A ``finalize_model_grads_func`` for megatron's training loop that also sums the LoRA
    partial gradients over TP (one bucketed all-reduce) before calling ``inner`` (default:
    megatron's ``finalize_model_grads``, which all-reduces over DP and sums the
    ``sequence_parallel`` parameters itself)::

        config.finalize_model_grads_func = make_finalize_model_grads_func()
    """
    if inner is None:
        from megatron.core.distributed import finalize_model_grads as inner

    def finalize_model_grads(model_chunks: list, *args, **kwargs):
        for chunk in model_chunks:
            finalize_lora_grads(chunk, include_sequence_parallel=False)
        return inner(model_chunks, *args, **kwargs)

    return finalize_model_grads


def allreduce_data_parallel_grads(model: torch.nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Average the trainable gradients over the data-parallel group in one collective."""
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if size == 1 or not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat /= size
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def clip_grad_norm_(model: torch.nn.Module, max_norm: Optional[float]) -> float:
    """Clip by the global gradient norm of the whole (sharded) model; returns the norm.

    ‖g‖² = Σ over TP-sharded parameters of every rank (summed over TP and PP)
         + Σ over replicated parameters counted once (identical on every TP rank after
           finalize_lora_grads; summed over PP only).
    """
    from megatron.core import parallel_state

    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    sharded = sum((p.grad.float().norm() ** 2 for p in params if getattr(p, "tensor_model_parallel", False)), torch.zeros(()))
    replicated = sum((p.grad.float().norm() ** 2 for p in params if not getattr(p, "tensor_model_parallel", False)), torch.zeros(()))
    if dist.is_initialized():
        dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
        total = sharded + replicated
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    else:
        total = sharded + replicated
    norm = total.sqrt().item()
    if max_norm is not None and norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm
