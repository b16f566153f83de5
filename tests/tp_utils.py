"""Plain-collective helpers for tests: gather a tensor-parallel shard into the full tensor.

These use torch.distributed directly (never dist_lora code), so a test that compares a
gathered result against a dense reference checks dist_lora independently.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def gather_tp(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate the TP ranks' shards along ``dim``."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_param(param: torch.Tensor) -> torch.Tensor:
    """The full tensor of a parameter, using megatron's sharding markers.

    A strided shard (stride s, e.g. a gated fc1's [gate_i; up_i]) holds s pieces; the full
    tensor is piece 0 of every rank, then piece 1 of every rank, and so on.
    """
    if not getattr(param, "tensor_model_parallel", False):
        return param.detach().clone()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    shards = gather_tp(param.detach(), dim).chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=dim)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([p[k] for k in range(stride) for p in pieces], dim=dim)


def all_tp_copies(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every TP rank's copy of a (supposedly replicated) tensor."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def tp_chunk(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """This TP rank's contiguous chunk of a full tensor along ``dim``."""
    size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return tensor.chunk(size, dim=dim)[rank]


def gathered_adapters(model) -> tuple[dict, dict, bool]:
    """For every LoRA layer of ``model`` (adapter "default"): the full product s·B·A, the
    full base weight, and whether every replicated factor is identical on all TP ranks."""
    products, weights, replicated_equal = {}, {}, True
    for name, layer in model.lora_layers():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        for factor in (a, b):
            if not getattr(factor, "tensor_model_parallel", False):
                replicated_equal &= all(torch.equal(c, factor) for c in all_tp_copies(factor.detach()))
        products[name] = layer.scaling["default"] * gather_param(b) @ gather_param(a)
        weights[name] = gather_param(layer.base_weight)
    return products, weights, replicated_equal
