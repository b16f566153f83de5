"""Which rank writes which adapter tensor of a sharded checkpoint, and where it sits.

Dense tensors: data-parallel rank 0 writes them; a replicated one on TP rank 0 only, a
TP-sharded one on every TP rank, into ``shard-ppP-tpT.safetensors``. MoE expert adapters
(:func:`dist_lora.parallel.grads.is_expert_parameter`) are split over expert-TP and live on
the EP rank owning the expert: expert-data-parallel rank 0 writes them, a replicated one on
expert-TP rank 0 only, into ``shard-ppP-tpT-epE.safetensors`` (T the expert-TP rank). Keys
are global names (:mod:`dist_lora.naming`: global layer and expert indices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..naming import global_module_name
from ..parallel.grads import is_expert_parameter
from .manifest import shard_file_name
from .peft_format import expected_keys, resolve_parameter

if TYPE_CHECKING:
    from ..model import LoraModel


def parallel_ranks() -> dict[str, int]:
    """This process's TP / PP / DP (and expert TP / EP / DP) coordinates and sizes (all 0/1
    without megatron state)."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return {
                "tp": ps.get_tensor_model_parallel_rank(),
                "tp_size": ps.get_tensor_model_parallel_world_size(),
                "pp": ps.get_pipeline_model_parallel_rank(),
                "pp_size": ps.get_pipeline_model_parallel_world_size(),
                "dp": ps.get_data_parallel_rank(),
                "etp": ps.get_expert_tensor_parallel_rank(),
                "etp_size": ps.get_expert_tensor_parallel_world_size(),
                "ep": ps.get_expert_model_parallel_rank(),
                "ep_size": ps.get_expert_model_parallel_world_size(),
                "edp": ps.get_expert_data_parallel_rank(),
            }
    except ImportError:
        pass
    return {"tp": 0, "tp_size": 1, "pp": 0, "pp_size": 1, "dp": 0, "etp": 0, "etp_size": 1, "ep": 0, "ep_size": 1, "edp": 0}


def param_tp_rank_size(param: torch.Tensor, ranks: dict) -> tuple[int, int]:
    """(rank, size) of the TP group ``param`` is split over: expert-TP for a MoE expert adapter
    (:func:`dist_lora.parallel.grads.is_expert_parameter`), else TP."""
    if is_expert_parameter(param):
        return ranks.get("etp", 0), ranks.get("etp_size", 1)
    return ranks["tp"], ranks["tp_size"]


def shard_file_of(kind: str, param: torch.Tensor, ranks: dict) -> str:
    """The file this rank writes ``param``'s pieces to (an expert's: its expert-TP and EP ranks)."""
    if is_expert_parameter(param):
        return shard_file_name(kind, ranks["pp"], ranks.get("etp", 0), ranks.get("ep", 0))
    return shard_file_name(kind, ranks["pp"], ranks["tp"])


def local_tensors(model: "LoraModel", adapter: str) -> dict[str, tuple[torch.nn.Module, str]]:
    """Global key -> (module, parameter path) of every tensor of ``adapter`` on this rank."""
    return expected_keys(model, adapter, module_key=lambda name: global_module_name(model.model, name))


def owned_parameters(model: "LoraModel", adapter: str, ranks: dict) -> list[tuple[str, torch.nn.Parameter]]:
    """(global key, parameter) of every adapter tensor this rank writes (``ranks``:
    :func:`parallel_ranks`): none on data-parallel ranks > 0, a replicated tensor only on TP
    rank 0, a TP-sharded one on every TP rank (its pieces: :func:`~.pieces.shard_pieces`).
    MoE expert adapters: the same over expert-DP and expert-TP, on every EP rank (each holds
    its own experts)."""
    owned = []
    for key, (module, path) in local_tensors(model, adapter).items():
        sub, pname = resolve_parameter(module, path, adapter)
        param = getattr(sub, pname)
        if ranks["edp" if is_expert_parameter(param) else "dp"] != 0:
            continue
        rank, size = param_tp_rank_size(param, ranks)
        sharded = getattr(param, "tensor_model_parallel", False) and size > 1
        if sharded or rank == 0:
            owned.append((key, param))
    return owned


def layout_record(model: "LoraModel", ranks: dict, world: int) -> dict:
    """The manifest's layout: TP, PP, world size (and EP, expert-TP for a model with expert adapters)."""
    layout = {"tp": ranks["tp_size"], "pp": ranks["pp_size"], "world": world}
    if any(is_expert_parameter(p) for p in model.parameters()):
        layout.update(ep=ranks.get("ep_size", 1), etp=ranks.get("etp_size", 1))
    return layout
