"""Module names that do not depend on the parallel layout.

Under pipeline parallelism a megatron stage numbers its layers locally (``decoder.layers.0``
on stage 1 may be global layer 12). Seeds and checkpoint keys use the global name, read from
each ``TransformerLayer.layer_number`` (1-based, global), so every layout agrees on them.

Under expert parallelism a MoE layer's ``SequentialMLP`` holds only its EP rank's experts,
numbered locally: ``mlp.experts.local_experts.J`` is global expert
``e = ep_rank · num_local_experts + J`` (megatron's own mapping, see its
``SequentialMLP.sharded_state_dict``). Global names carry ``e``, so patterns, init seeds and
checkpoint keys are the same at any EP size (:func:`global_expert_index` /
:func:`local_expert_index` are the one home of that mapping; :func:`global_module_name` /
:func:`local_module_name` apply it to module names).
"""

from __future__ import annotations

import re
from typing import Optional

import torch.distributed as dist
from torch import nn

EXPERTS_LIST = "local_experts"  # megatron SequentialMLP's list of this EP rank's experts


def is_expert_container(module: nn.Module) -> bool:
    """A megatron ``SequentialMLP`` (or alike): ``local_experts`` plus ``num_local_experts`` and
    its expert-parallel group ``ep_group``."""
    return isinstance(getattr(module, EXPERTS_LIST, None), nn.ModuleList) and hasattr(module, "num_local_experts")


def expert_parallel_rank_size(experts: nn.Module) -> tuple[int, int]:
    """(EP rank, EP size) of an expert container (0, 1 without a process group)."""
    group = getattr(experts, "ep_group", None)
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_expert_index(local: int, num_experts: int, ep_rank: int, ep_size: int) -> int:
    """The global index of local expert ``local`` on expert-parallel rank ``ep_rank`` of
    ``ep_size``: rank r holds experts r·E/ep .. (r+1)·E/ep - 1, in order (megatron's MoELayer)."""
    if num_experts % ep_size or not 0 <= local < num_experts // ep_size:
        raise ValueError(f"local expert {local} does not exist with {num_experts} experts over EP={ep_size}.")
    return ep_rank * (num_experts // ep_size) + local


def local_expert_index(global_index: int, num_experts: int, ep_rank: int, ep_size: int) -> Optional[int]:
    """The inverse of :func:`global_expert_index`: the local index of global expert
    ``global_index`` on EP rank ``ep_rank``, None when another EP rank holds it."""
    local = global_index - ep_rank * (num_experts // ep_size)
    return local if 0 <= local < num_experts // ep_size else None


def expert_placement(experts: nn.Module) -> tuple[int, int, int]:
    """(number of experts, EP rank, EP size) of an expert container (a SequentialMLP), the last
    three arguments of :func:`global_expert_index`."""
    rank, size = expert_parallel_rank_size(experts)
    return experts.num_local_experts * size, rank, size


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
            convert = global_expert_index if to_global else local_expert_index
            index = convert(int(part), *expert_placement(parent))
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
