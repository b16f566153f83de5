"""One adapter shared by all experts of a MoE layer (``runtime_config.expert_adapters="shared"``).

By default every expert's ``linear_fc1`` / ``linear_fc2`` gets its own adapter, keyed by its
global name (``decoder.layers.N.mlp.experts.local_experts.<e>.linear_fc1``). Shared: the
experts of a layer use the same A and B per projection, keyed by the layer's expert-free name
(``decoder.layers.N.mlp.experts.linear_fc1``: its init seed, rank and alpha patterns), so the
init is the same at any EP size. Each local expert's LoRA layer holds the same parameter
objects; autograd sums the local experts' gradients, and the parameters are marked
``ep_partial_grad`` so that :func:`dist_lora.parallel.grads.finalize_lora_grads` also sums
them over the expert-parallel ranks (each holds other experts).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from torch import nn

from ..naming import is_expert_name, shared_expert_name
from ..parallel import grads
from . import math as lm
from .base import LoraLayer

SHARED = "shared"


def share_expert_targets(targets: Sequence, config, seed: int, adapter_name: str) -> list:
    """``targets`` (injection's ``Target`` records) with every expert target's rank, alpha and
    init seed taken from its layer's expert-free name when ``config`` shares expert adapters."""
    if config.runtime_config.expert_adapters != SHARED:
        return list(targets)
    out = []
    for target in targets:
        if is_expert_name(target.global_name):
            key = shared_expert_name(target.global_name)
            target = dataclasses.replace(
                target, r=config.rank_for(key), alpha=config.alpha_for(key), seed=lm.init_seed(seed, key, adapter_name)
            )
        out.append(target)
    return out


def tie_shared_expert_adapters(model: nn.Module, targets: Sequence, config, adapter_name: str) -> None:
    """Shared expert adapters: every local expert of a layer takes the first one's adapter
    modules (the same parameters), marked as partial over EP. Nothing for per-expert adapters."""
    if config.runtime_config.expert_adapters != SHARED:
        return
    first: dict[str, LoraLayer] = {}
    for target in targets:
        if not is_expert_name(target.global_name):
            continue
        layer = model.get_submodule(target.name)
        owner = first.setdefault(shared_expert_name(target.global_name), layer)
        stores = [s for s in owner.adapter_layer_names if adapter_name in getattr(owner, s)]
        if owner is not layer:
            for store in stores:
                getattr(layer, store)[adapter_name] = getattr(owner, store)[adapter_name]
        grads.mark_expert_parameters(
            [p for store in stores for p in getattr(owner, store)[adapter_name].parameters()], shared=True
        )
