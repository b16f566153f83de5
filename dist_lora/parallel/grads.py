"""Once-per-step gradient synchronisation of replicated adapter factors.

Some replicated parameters get a per-rank partial gradient that must be summed over TP before
the optimizer step: the replicated factor of every fused parallel LoRA layer (column A, row B;
see :mod:`dist_lora.layers.fused`) and of a vocab-parallel embedding (B, see
:mod:`dist_lora.layers.parallel_embedding`), the row B of the reference path under sequence
parallelism, any trainable parameter megatron marks ``sequence_parallel`` (its norm
weights under SP), and a trainable copy of a per-head q/k norm (``qk_layernorm``) when the
heads are split over TP (tagged ``head_norm_partial_grad``, :func:`mark_head_norm_partial_grads`).
The layers tag theirs ``tp_partial_grad = True`` (:func:`mark_tp_partial_grads`),
so this module finds them by that attribute and knows no layer class. :func:`finalize_lora_grads`
sums all of them in one flattened all-reduce per step — never one collective per layer.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

# Attributes of the parameters whose partial gradients megatron's own finalize_model_grads sums
# over TP: norm weights under sequence parallelism, and the q/k norms under qk_layernorm
# (megatron finds those by their module name, ``q_layernorm`` / ``k_layernorm``).
MEGATRON_SUMMED_ATTRIBUTES = ("sequence_parallel", "head_norm_partial_grad")


def mark_tp_partial_grads(params: Iterable[torch.nn.Parameter], partial: Iterable[torch.nn.Parameter]) -> None:
    """Set ``tp_partial_grad`` on each of ``params``: True for those in ``partial`` (their gradient
    on each rank is a partial sum over TP), False for the rest. Layers call this where their
    adapter parameters are created and whenever the set changes (e.g. the TP communication mode)."""
    partial_ids = {id(p) for p in partial}
    for param in params:
        param.tp_partial_grad = id(param) in partial_ids


def mark_head_norm_partial_grads(params: Iterable[torch.nn.Parameter], partial: bool) -> None:
    """Set ``head_norm_partial_grad`` on the parameters of a per-head q/k norm: True when the
    heads are split over TP, so each rank's gradient sums over its own heads only."""
    for param in params:
        param.head_norm_partial_grad = partial


def tp_partial_grad_parameters(model: torch.nn.Module, include_sequence_parallel: bool = True) -> list[torch.nn.Parameter]:
    """Trainable parameters whose gradient is a per-rank partial sum over TP: those tagged
    ``tp_partial_grad`` (the LoRA layers' replicated factors, :func:`mark_tp_partial_grads`)
    and (``include_sequence_parallel``) those megatron's finalize_model_grads sums itself
    (:data:`MEGATRON_SUMMED_ATTRIBUTES`: ``sequence_parallel`` norms, ``head_norm_partial_grad``
    q/k norms)."""
    attributes = ("tp_partial_grad",) + (MEGATRON_SUMMED_ATTRIBUTES if include_sequence_parallel else ())
    return [p for p in model.parameters() if p.requires_grad and any(getattr(p, a, False) for a in attributes)]


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
    ``sequence_parallel`` parameters and, under ``qk_layernorm``, the q/k norms itself)::

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
    zero = torch.zeros((), device=params[0].grad.device if params else None)  # NCCL reduces device tensors only
    sharded = sum((p.grad.float().norm() ** 2 for p in params if getattr(p, "tensor_model_parallel", False)), zero)
    replicated = sum((p.grad.float().norm() ** 2 for p in params if not getattr(p, "tensor_model_parallel", False)), zero)
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
