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


# --- Mixture-of-experts adapters ------------------------------------------------------------
#
# Expert adapters (:func:`mark_expert_parameters`) carry ``is_expert = True``: their layer's TP
# group is megatron's expert-TP group, so their partial sums go over expert-TP, and their
# data-parallel reduction over the expert-data-parallel group (megatron's own marker for that,
# ``allreduce = False``, is set too, so megatron's DDP puts them in its expert buckets). An
# adapter shared by all experts of a layer also carries ``ep_partial_grad = True``: each EP rank
# holds the sum over its own experts, so the gradient is summed over EP as well. Per step,
# :func:`finalize_lora_grads` does one flattened all-reduce per group with partial gradients:
#
#     dense, tp_partial_grad (and megatron's SP-summed)   TP group
#     expert, tp_partial_grad                              expert-TP group
#     expert, ep_partial_grad                              EP group
#     expert, tp_partial_grad and ep_partial_grad          expert-TP x EP group
#
# Data parallel (:func:`allreduce_data_parallel_grads`): dense gradients are averaged over DP;
# expert gradients are summed over the expert-DP group and divided by the DP size (expert-DP
# ranks hold disjoint tokens: other data-parallel batches, or under SP other sequence shards of
# the same batch, which a dense layer sums over TP), as megatron's DDP does.


def mark_expert_parameters(params: Iterable[torch.nn.Parameter], shared: bool = False) -> None:
    """Mark the adapter parameters of an expert layer (see the section comment above); ``shared``:
    one adapter used by every expert of the layer, so its gradient is also a partial sum over EP."""
    for param in params:
        param.is_expert = True
        param.allreduce = False  # megatron's DDP: reduce over the expert-data-parallel group
        param.ep_partial_grad = shared or bool(getattr(param, "ep_partial_grad", False))  # once shared, always


def is_expert_parameter(param: torch.Tensor) -> bool:
    return bool(getattr(param, "is_expert", False))


def _partial_sum_group(expert: bool, tp_partial: bool, ep_partial: bool):
    from megatron.core import parallel_state as ps

    if not expert:
        return ps.get_tensor_model_parallel_group()
    if tp_partial and ep_partial:
        return ps.get_expert_tensor_and_model_parallel_group()
    return ps.get_expert_tensor_parallel_group() if tp_partial else ps.get_expert_model_parallel_group()


def _all_reduce_flat(grads: list[torch.Tensor], group: Optional[dist.ProcessGroup], divide: int = 1) -> None:
    """All-reduce ``grads`` over ``group`` as one flat tensor (then divide), in place."""
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if divide != 1:
        flat /= divide
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def _grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient as the training loop keeps it: megatron's DDP accumulates into ``main_grad``."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


def finalize_lora_grads(
    model: torch.nn.Module, group: Optional[dist.ProcessGroup] = None, include_sequence_parallel: bool = True
) -> int:
    """Sum the partial gradients over their groups, one flattened collective per group (dense
    ones over TP, or ``group``; MoE expert adapters: see the section above); returns how many
    tensors were reduced. Call after backward (and gradient accumulation), before clipping and
    the optimizer step. Every rank must call it. With megatron's own finalize_model_grads (which
    already sums ``sequence_parallel`` parameters) use :func:`make_finalize_model_grads_func`."""
    tp_partial = {id(p) for p in tp_partial_grad_parameters(model, include_sequence_parallel)}
    buckets: dict[tuple[bool, bool, bool], list[torch.Tensor]] = {}
    for param in model.parameters():
        expert = is_expert_parameter(param)
        key = (expert, id(param) in tp_partial, expert and bool(getattr(param, "ep_partial_grad", False)))
        grad = _grad(param) if param.requires_grad and (key[1] or key[2]) else None
        if grad is not None:
            buckets.setdefault(key, []).append(grad)
    if not dist.is_initialized():
        return 0
    reduced = 0
    for key, grads in sorted(buckets.items()):
        bucket_group = group if (group is not None and not key[0]) else _partial_sum_group(*key)
        if dist.get_world_size(bucket_group) > 1:
            _all_reduce_flat(grads, bucket_group)
            reduced += len(grads)
    return reduced


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
    """Average the trainable gradients over data parallelism: dense ones over the DP group
    (``group``), expert ones summed over the expert-DP group and divided by the DP size (module
    docstring); one collective per group."""
    from megatron.core import parallel_state

    if group is None:
        group = parallel_state.get_data_parallel_group()
    size = dist.get_world_size(group)
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    dense = [p.grad for p in params if not is_expert_parameter(p)]
    expert = [p.grad for p in params if is_expert_parameter(p)]
    if size > 1 and dense:
        _all_reduce_flat(dense, group, divide=size)
    if expert:
        expert_group = parallel_state.get_expert_data_parallel_group()
        if dist.get_world_size(expert_group) > 1:
            _all_reduce_flat(expert, expert_group, divide=size)
        elif size > 1:  # one expert-DP rank: its gradient is the whole sum, still divided by DP
            for grad in expert:
                grad /= size


def _norm_group(param: torch.nn.Parameter):
    """The group over which ``param``'s squared gradient norm is summed (None: counted once):
    its TP (expert-TP) group when sharded, times EP for a per-expert adapter (each EP rank holds
    other experts)."""
    from megatron.core import parallel_state as ps

    sharded = bool(getattr(param, "tensor_model_parallel", False))
    if not is_expert_parameter(param):
        return ps.get_tensor_model_parallel_group() if sharded else None
    if getattr(param, "ep_partial_grad", False):  # shared by the experts: the same on every EP rank
        return ps.get_expert_tensor_parallel_group() if sharded else None
    return ps.get_expert_tensor_and_model_parallel_group() if sharded else ps.get_expert_model_parallel_group()


def clip_grad_norm_(model: torch.nn.Module, max_norm: Optional[float]) -> float:
    """Clip by the global gradient norm of the whole (sharded) model; returns the norm.

    ‖g‖² = Σ over TP-sharded parameters of every rank (summed over TP and PP)
         + Σ over replicated parameters counted once (identical on every TP rank after
           finalize_lora_grads; summed over PP only)
         + expert adapters: sharded ones summed over expert-TP, and per-expert ones over EP
           (:func:`_norm_group`).
    """
    from megatron.core import parallel_state

    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    zero = torch.zeros((), device=params[0].grad.device if params else None)  # NCCL reduces device tensors only
    if not dist.is_initialized():
        total = sum((p.grad.float().norm() ** 2 for p in params), zero)
    else:
        # group -> Σ ‖g‖² of its parameters; only the groups some parameter needs are reduced (a
        # dense model: TP only), and every member of a group holds the same kinds of parameters
        parts: dict[Optional[dist.ProcessGroup], torch.Tensor] = {}
        for p in params:
            group = _norm_group(p)
            parts[group] = parts.get(group, zero) + p.grad.float().norm() ** 2
        for group, part in parts.items():
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(part, group=group)
        total = sum(parts.values(), zero)
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    norm = total.sqrt().item()
    if max_norm is not None and norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm
