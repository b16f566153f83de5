"""Module names that do not depend on the parallel layout.

Under pipeline parallelism a megatron stage numbers its layers locally (``decoder.layers.0``
on stage 1 may be global layer 12). Seeds and checkpoint keys use the global name, read from
each ``TransformerLayer.layer_number`` (1-based, global), so every layout agrees on them.

Under expert parallelism a MoE layer's ``SequentialMLP`` holds only its EP rank's experts,
numbered locally: ``mlp.experts.local_experts.J`` is global expert
``e = ep_rank · num_local_experts + J`` (megatron's own mapping, see its
``SequentialMLP.sharded_state_dict``). Global names carry ``e``, so patterns, init seeds and
checkpoint keys are the same at any EP size (:func:`global_expert_index` /
:func:`local_expert_index` are the one home of that mapping).
"""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

EXPERTS_LIST = "local_experts"  # megatron SequentialMLP's list of this EP rank's experts


def is_expert_container(module: nn.Module) -> bool:
    """A megatron ``SequentialMLP`` (or alike): ``local_experts`` plus ``num_local_experts`` and
    its expert-parallel group ``ep_group``."""
    return isinstance(getattr(module, EXPERTS_LIST, None), nn.ModuleList) and hasattr(module, "num_local_experts")


def expert_parallel_rank_size(experts: nn.Module) -> tuple[int, int]:
    """(EP rank, EP size) of an expert container (0, 1 without a process group)."""
    group = getattr(experts, "ep_group", None)
    if group is None:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_expert_index(experts: nn.Module, local: int) -> int:
    """Global index of local expert ``local`` of ``experts`` (a SequentialMLP)."""
    rank, _ = expert_parallel_rank_size(experts)
    return rank * experts.num_local_experts + local


def local_expert_index(experts: nn.Module, global_index: int) -> Optional[int]:
    """Local index of global expert ``global_index`` in ``experts``, None if another EP rank owns it."""
    rank, _ = expert_parallel_rank_size(experts)
    local = global_index - rank * experts.num_local_experts
    return local if 0 <= local < experts.num_local_experts else None


_EXPERT_IN_NAME = re.compile(rf"\.{EXPERTS_LIST}\.\d+(?=\.|$)")


def is_expert_name(name: str) -> bool:
    """Whether module ``name`` lies inside one expert (``....local_experts.<e>...``)."""
    return _EXPERT_IN_NAME.search(name) is not None


def shared_expert_name(name: str) -> str:
    """``name`` without its expert index: ``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1``
    -> ``decoder.layers.3.mlp.experts.linear_fc1``, the name of an adapter shared by all experts."""
    return _EXPERT_IN_NAME.sub("", name, count=1)


def global_module_name(model: nn.Module, name: str) -> str:
    """``name`` with every local layer index replaced by the layer's global index, and every
    local expert index by the expert's global index."""
    return _rename(model, name, to_global=True)


def local_module_name(model: nn.Module, global_name: str) -> Optional[str]:
    """The inverse of :func:`global_module_name` for expert indices: ``global_name`` with each
    global expert index replaced by this EP rank's local index; None when another EP rank owns
    that expert or the module does not exist. (Layer indices are left as given.)"""
    return _rename(model, global_name, to_global=False)


def _rename(model: nn.Module, name: str, to_global: bool) -> Optional[str]:
    module, parent, parts = model, None, []
    for part in name.split("."):
        if part.isdigit() and parts and parts[-1] == EXPERTS_LIST and is_expert_container(parent):
            index = global_expert_index(parent, int(part)) if to_global else local_expert_index(parent, int(part))
            if index is None:
                return None
            local = part if to_global else str(index)
            parent, module = module, _child(module, local, to_global)
            part = str(index)
        else:
            parent, module = module, _child(module, part, to_global)
            number = getattr(module, "layer_number", None)
            if to_global and part.isdigit() and isinstance(number, int):
                part = str(number - 1)
        if module is None:
            return None
        parts.append(part)
    return ".".join(parts)


def _child(module: nn.Module, part: str, strict: bool) -> Optional[nn.Module]:
    return getattr(module, part) if strict else getattr(module, part, None)
