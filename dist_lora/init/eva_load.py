"""Load an EVA state dict into a LoraModel (PEFT's ``_load_eva_state_dict`` semantics).

For each layer with the adapter, with r_l / alpha_l its configured rank / alpha:
  in the state dict with A_l [r'_l, in]:
    r'_l = 0      the adapter is removed from the layer (the layer is unwrapped when it has no
                  other adapter) and the layer leaves ``target_modules``;
    r'_l != r_l   the adapter is re-created with rank r'_l, alpha scaled (see :mod:`.eva_ranks`);
    then A = this rank's shard of A_l (row-parallel: columns, like the base weight; column-
    parallel and plain layers: all of it, identical on every TP rank) and B = 0.
  not in it       re-initialised as ``init_lora_weights=True`` (PEFT does the same), with a warning.
The adapter's config then gets ``rank_pattern`` / ``alpha_pattern`` entries (global module
names) for every layer whose rank / alpha differs from r / lora_alpha (the previous patterns
are replaced, as in PEFT) and, when layers were removed, ``target_modules`` = the sorted list
of the layers that keep the adapter. Under pipeline parallelism the entries of all stages are
merged, so every stage holds the same config.

State dict keys are global module names (``get_eva_state_dict``'s); PEFT's keys, prefixed with
``base_model.model.``, are accepted too.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from ..config import EvaConfig, explicit_pattern
from ..layers import math as lm
from ..naming import global_module_name
from ..parallel.setup import pipeline_group
from ..parallel.zero import refuse_registered
from .eva_ranks import scaled_alpha

PEFT_PREFIX = "base_model.model."


def _pipeline_merge(entries: list) -> list:
    group = pipeline_group()
    if group is None:
        return entries
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, entries, group=group)
    return [e for part in parts for e in part]


@torch.no_grad()
def load_eva_state_dict(model, eva_state_dict: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Set adapter ``adapter_name`` of ``model`` (a LoraModel) from ``eva_state_dict``
    ({module name: A [rank, in_features]}, full, unsharded). Validates every entry first."""

    refuse_registered(model, "cannot load an EVA state dict")  # A would be re-created, B zeroed
    config = model.peft_config[adapter_name]
    eva = config.eva_config or EvaConfig()
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in eva_state_dict.items()}
    layers = [
        (name, global_module_name(model.model, name), layer)
        for name, layer in model.lora_layers()
        if adapter_name in layer.lora_A
    ]
    for _, gname, layer in layers:
        a = state.get(gname)
        if a is not None and (a.ndim != 2 or a.shape[1] != layer.in_features):
            raise ValueError(
                f"eva_state_dict[{gname!r}] has shape {tuple(a.shape)}; expected [rank, {layer.in_features}]."
            )
    entries, missing = [], []  # (global name, kept, rank, alpha)
    for name, gname, layer in layers:
        r, alpha = config.rank_for(gname), config.alpha_for(gname)
        a = state.get(gname)
        seed = lm.init_seed(model.adapter_seed, gname, adapter_name)
        options = dict(
            lora_dropout=config.lora_dropout, use_rslora=config.use_rslora, lora_bias=config.lora_bias,
            use_dora=config.use_dora, seed=seed,
        )
        if a is None:
            layer.update_layer(adapter_name, r=r, lora_alpha=alpha, init_lora_weights=True, **options)
            missing.append(gname)
            entries.append((gname, True, r, alpha))
            continue
        new_rank = a.shape[0]
        if new_rank == 0:
            layer.delete_adapter(adapter_name)
            if not layer.lora_A:
                model.replace_module(name, layer.base_layer)
            entries.append((gname, False, 0, alpha))
            continue
        alpha = scaled_alpha(alpha, r, new_rank, eva.adjust_scaling_factors)
        if new_rank != r or layer.lora_A[adapter_name].weight.is_meta:
            layer.update_layer(adapter_name, r=new_rank, lora_alpha=alpha, init_lora_weights="eva", **options)
        weight = layer.lora_A[adapter_name].weight
        weight.copy_(layer.shard_a(a.to(torch.float32)).to(device=weight.device, dtype=weight.dtype))
        layer.lora_B[adapter_name].weight.zero_()
        entries.append((gname, True, new_rank, alpha))
    entries = _pipeline_merge(entries)
    kept = {gname: (rank, alpha) for gname, keep, rank, alpha in entries if keep}
    config.rank_pattern = explicit_pattern({n: rank for n, (rank, _) in kept.items()}, config.r)
    config.alpha_pattern = explicit_pattern({n: alpha for n, (_, alpha) in kept.items()}, config.lora_alpha)
    if len(kept) < len(entries):
        config.target_modules = sorted(kept)
    model.set_adapter(model.active_adapters)  # new parameters: trainable as before
    if missing and (not dist.is_initialized() or dist.get_rank() == 0):
        warnings.warn(
            f"EVA: layers {missing} are not in the eva_state_dict and were initialised with init_lora_weights=True.",
            stacklevel=3,
        )
