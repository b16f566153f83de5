"""Merging adapters into the base weights of a (possibly tensor-parallel) model, in place.

On a TP shard the local ΔW = s·B_local·A_local is exactly this rank's shard of the full ΔW
(column-parallel: B_i·A, the rows of W_i; row-parallel: B·A_i, the columns of W_i), so every
rank merges its own shard and no base weight is ever gathered. The arithmetic is
:meth:`dist_lora.layers.LoraLayer.merged_values` (:func:`dist_lora.layers.math.merged_weight`):
W' = W + ΔW (DoRA: rescaled per row) in fp32, cast back to W's dtype.

``safe_merge`` is all-or-nothing on every rank: each rank computes every merged weight it
would write (the same values, cast to the weight's dtype) and checks it finite *before any weight changes*;
one flag is then all-reduced over the ranks, so a NaN/Inf on one rank's shard aborts the
merge on all of them, each raising an error that names the offending module(s) and rank(s).
Structural refusals (base weights shared by replicated layers, lora_bias on a base layer
without bias) are found before any weight changes too, and on a megatron model all ranks
agree on them through the same one-flag all-reduce (so even a plain merge of a megatron model
costs one tiny collective; all ranks must call it, as they do every model-level method).

Under DeepSpeed ZeRO-3 each layer is gathered for its check and its merge (one layer at a
time), and rank 0's merged weight is the one re-partitioned (:mod:`dist_lora.parallel.zero`).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from .parallel import zero
from .layers import LoraLayer
from .layers.parallel import ParallelLoraLayer


class MergeError(ValueError):
    """Merging would produce non-finite weights (nothing was merged), or cannot be done."""


def merge_group(layers: Iterable[LoraLayer]) -> Optional[dist.ProcessGroup]:
    """The ranks that must agree on a merge: the default (world) group in a distributed
    megatron job, where every rank runs the same program; None (no collective) for a plain
    model or a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if any(isinstance(layer, ParallelLoraLayer) for layer in layers):
        return dist.group.WORLD
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    # A pipeline stage may hold no LoRA layer of its own; it still takes part.
    return dist.group.WORLD if parallel_state.model_parallel_is_initialized() else None


def check_finite(
    layers: list[tuple[str, LoraLayer]],
    names_of: Callable[[LoraLayer], list[str]],
    group: Optional[dist.ProcessGroup],
    finite: bool = True,
    problems: Optional[list[str]] = None,
) -> None:
    """Raise :class:`MergeError` on every rank of ``group`` if any rank found a problem (given
    in ``problems``) or, with ``finite``, merging would give a NaN/Inf weight on any of them;
    touches no weight. One all-reduce of one flag on success."""
    bad = list(problems or [])
    for name, layer in layers if finite and not bad else []:
        names = names_of(layer)
        if names:
            with zero.gathered(layer.parameters()):  # ZeRO-3: read the full weight
                which = layer.merged_values(names).non_finite()  # exactly what the merge would write
            if which is not None:
                bad.append(f"merging adapters {names} gives NaN or Inf values in {name}.{which}")
    if group is not None:
        flag = torch.tensor([1 if bad else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item():  # error path only: tell every rank what was found where
            found = [None] * dist.get_world_size(group)
            dist.all_gather_object(found, (dist.get_rank(), bad), group=group)
            bad = [f"{b} (rank {rank})" for rank, items in found for b in items]
    if bad:
        raise MergeError(f"{'; '.join(bad)}; nothing was merged.")


def merge_layers(
    layers: list[tuple[str, LoraLayer]],
    adapter_names: Optional[list[str]],
    default_names: list[str],
    safe_merge: bool = False,
    progress: Optional[Callable[[list], Iterable]] = None,
) -> None:
    """Merge ``adapter_names`` (default: ``default_names``, the active adapters) into every
    layer, in place. Adapters already merged are skipped with one warning for the model
    (not one per layer). ``safe_merge``: see the module docstring (collective when TP/PP)."""
    wanted = list(default_names if adapter_names is None else adapter_names)

    def names_of(layer: LoraLayer) -> list[str]:
        return [n for n in wanted if n in layer.lora_A and n not in layer.merged_adapters]

    problems = []  # structural problems, found before any weight changes
    try:
        refuse_shared_weights([(name, layer) for name, layer in layers if names_of(layer)])
    except MergeError as e:
        problems.append(str(e).rstrip("."))
    for name, layer in layers:
        if getattr(layer.base_layer, "bias", None) is None and any(
            layer.lora_B[n].bias is not None for n in names_of(layer)
        ):
            problems.append(f"{name} has lora_bias adapters but its base layer has no bias to merge them into")
    group = merge_group(layer for _, layer in layers)
    if safe_merge or group is not None:  # every rank agrees on refusing (one flag all-reduced)
        check_finite(layers, names_of, group, finite=safe_merge, problems=problems)
    elif problems:
        raise MergeError(f"{'; '.join(problems)}; nothing was merged.")
    already = sorted({n for _, layer in layers for n in wanted if n in layer.merged_adapters})
    if already:
        warnings.warn(f"adapters {already} are already merged; they are not merged again.", UserWarning, stacklevel=3)
    for _, layer in (progress or (lambda items: items))(layers):
        names = names_of(layer)
        if names:  # ZeRO-3: the layer gathered, rank 0's merged weight re-partitioned
            with zero.gathered(layer.parameters(), modifier_rank=0):
                layer.merge(adapter_names=names)


def refuse_shared_weights(layers: list[tuple[str, LoraLayer]]) -> None:
    """Replicated layers (``layer_replication``, see :mod:`dist_lora.replication`) share their
    base weights between copies that carry different adapters: merging would add every copy's
    ΔW to the one shared weight. Refused, naming the modules, unless the shared weights were
    materialised (copied) first; checked on the tensors themselves, not on a config flag."""
    seen: dict[tuple[int, int], str] = {}
    for name, layer in layers:
        weight = layer.base_weight
        if weight.device.type == "meta" or weight.numel() == 0:
            continue
        key = (weight.untyped_storage().data_ptr(), weight.storage_offset())
        if key in seen:
            raise MergeError(
                f"{name} and {seen[key]} share one base weight (replicated layers, layer_replication): their "
                "adapters cannot be merged into it. Materialise the replicated layers first "
                "(dist_lora.replication.materialize) to give each its own copy."
            )
        seen[key] = name


def refuse_replicated_layers(configs: Iterable) -> None:
    """Refuse a merge when an adapter config asks for ``layer_replication`` (its replicas share
    base weights); :meth:`LoraModel._check_merge_allowed` skips this once they are materialised."""
    if any(getattr(config, "layer_replication", None) for config in configs):
        raise MergeError(
            "this model uses layer_replication: its replicated layers share base weights, so their adapters "
            "cannot be merged into them. Materialise the replicated layers first (merge_and_unload(materialize=True))."
        )
