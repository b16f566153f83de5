"""What kind of layer a module is, and how a linear one is split over tensor parallelism.

The one home of the module-kind predicates that targeting, the LoRA layer classes, the
init checks and the init drivers all ask. Optional libraries (transformers' Conv1D,
bitsandbytes, megatron-core) are recognised by class name, so none of them is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..parallel import zero
from ..parallel import tp
from .base import LoraLayer


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (a linear layer whose weight is stored [in, out])."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear4bit(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit (and subclasses)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def parallel_linear_kind(module: nn.Module) -> Optional[str]:
    """'column' or 'row' for megatron's parallel linear layers (and subclasses), else None."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("megatron.core"):
            if cls.__name__ == "ColumnParallelLinear":
                return "column"
            if cls.__name__ == "RowParallelLinear":
                return "row"
    return None


TRANSFORMER_ENGINE_LINEARS = ("TELayerNormColumnParallelLinear", "TEColumnParallelLinear", "TERowParallelLinear",
                              "TELinear", "TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear")


def transformer_engine_linear(module: nn.Module) -> Optional[str]:
    """The class name of a megatron TransformerEngine linear layer (and subclasses), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in TRANSFORMER_ENGINE_LINEARS and cls.__module__.startswith("megatron.core"):
            return cls.__name__
    return None


def embedding_kind(module: nn.Module) -> Optional[str]:
    """'vocab_parallel' for megatron's VocabParallelEmbedding (and subclasses), 'embedding' for
    ``nn.Embedding`` (and subclasses, e.g. scaled word embeddings), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ == "VocabParallelEmbedding" and cls.__module__.startswith("megatron.core"):
            return "vocab_parallel"
    return "embedding" if isinstance(module, nn.Embedding) else None


def is_router(module: nn.Module) -> bool:
    """megatron's MoE ``TopKRouter`` (and subclasses): a replicated linear map to expert logits,
    adapted only when ``target_modules`` names it (never by ``all-linear``)."""
    return any(c.__name__ == "TopKRouter" and c.__module__.startswith("megatron.core") for c in type(module).__mro__)


def is_linear_layer(module: nn.Module) -> bool:
    """nn.Linear, Conv1D or a megatron parallel linear: what ``all-linear`` targets."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or parallel_linear_kind(module) is not None


def is_supported_layer(module: nn.Module) -> bool:
    """A layer LoRA can wrap: a linear one, or an embedding or a MoE router (targeted by name only)."""
    return is_linear_layer(module) or embedding_kind(module) is not None or is_router(module)


def base_module(module: nn.Module) -> nn.Module:
    """The layer a LoRA layer wraps; any other module itself."""
    return module.base_layer if isinstance(module, LoraLayer) else module


@dataclass
class LinearGeometry:
    """How a linear layer's weight is laid out: unsharded (``layout`` None: nn.Linear, Conv1D)
    or a megatron column / row parallel shard of ``size`` over its TP ``group``."""

    layout: Optional[str]  # "column", "row" or None
    group: object
    rank: int
    size: int
    stride: int  # megatron's partition stride (strided gated fc1)
    in_features: int  # global
    out_features: int
    sequence_parallel: bool

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The local weight as [out(_i), in(_i)] (under ZeRO-3: call inside ``zero.gathered``)."""
        w = module.weight
        return w.t() if is_conv1d(module) else w

    def local_shape(self, module: nn.Module) -> tuple[int, int]:
        """(out(_i), in(_i)) of the local weight, from ZeRO-3's full shape when partitioned."""
        shape = tuple(zero.full_shape(module.weight))
        return (shape[1], shape[0]) if is_conv1d(module) else (shape[0], shape[1])


def linear_geometry(module: nn.Module) -> LinearGeometry:
    """The :class:`LinearGeometry` of a (base) linear layer."""
    kind = parallel_linear_kind(module)
    if kind is None:
        shape = zero.full_shape(module.weight)  # ZeRO-3: .shape is the empty local piece
        out_f, in_f = (shape[1], shape[0]) if is_conv1d(module) else (shape[0], shape[1])
        return LinearGeometry(None, None, 0, 1, 1, in_f, out_f, False)
    group = tp.tp_group_of(module)
    rank, size = tp.group_rank_size(group)
    stride = tp.partition_stride(module.weight)
    sp = bool(getattr(module, "sequence_parallel", False)) and size > 1
    return LinearGeometry(kind, group, rank, size, stride, module.input_size, module.output_size, sp)
