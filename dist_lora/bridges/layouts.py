"""The fused megatron layouts of attention QKV and the gated MLP's fc1, one implementation each.

Every function works on dim 0 (output rows) of a tensor with any trailing dimensions, so the
same code moves base weights, biases and LoRA B factors ([out, r]) between layouts.

QKV. megatron's ``linear_qkv`` rows are grouped per query group g = 0..G-1::

    [q heads of g (H/G · d rows), k_g (d rows), v_g (d rows)]

and tensor parallelism gives rank i the whole groups i·G/t .. (i+1)·G/t - 1 (a plain stride-1
split of the fused rows). Hugging Face keeps ``q_proj`` ([H·d, in]), ``k_proj`` and ``v_proj``
([G·d, in]). Merging a *subset* of consecutive groups gives exactly that subset's rows of the
full fused tensor, which is how a rank builds its shard from its own q/k/v row ranges
(:func:`qkv_shard_row_ranges`) without reading anything else.

fc1. A gated MLP's full (master) ``linear_fc1`` is ``[gate; up]``, split with stride 2: rank i
holds ``[gate_i; up_i]``. So the naive concatenation of t shards is ``[g_0; u_0; g_1; u_1; ...]``
and :func:`split_gate_up` takes the number of concatenated shards to undo it.

:func:`merge_fused`, :func:`split_fused` and :func:`fused_shard_ranges` pick the functions of
a layout by the name a family table gives it ("qkv", "gate_up" or "none": a single part).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch


class Attention(NamedTuple):
    """The attention geometry a QKV layout needs: heads and query groups present, head size."""

    num_heads: int
    num_query_groups: int
    head_dim: int

    def shard(self, size: int) -> "Attention":
        """The geometry of one of ``size`` TP shards (whole query groups)."""
        return Attention(self.num_heads // size, self.num_query_groups // size, self.head_dim)


def _check_qkv_dims(num_heads: int, num_query_groups: int, head_dim: int) -> int:
    if num_heads <= 0 or num_query_groups <= 0 or head_dim <= 0:
        raise ValueError(
            f"bad attention dims: heads={num_heads}, query groups={num_query_groups}, head_dim={head_dim}."
        )
    if num_heads % num_query_groups:
        raise ValueError(f"num_heads ({num_heads}) is not a multiple of num_query_groups ({num_query_groups}).")
    return num_heads // num_query_groups


def merge_qkv_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int
) -> torch.Tensor:
    """Fuse q ([num_heads·d, ...]), k and v ([num_query_groups·d, ...]) into megatron's
    grouped ``linear_qkv`` rows. ``num_heads`` / ``num_query_groups`` are the counts present in
    these tensors (a TP shard passes its own counts)."""
    per_group = _check_qkv_dims(num_heads, num_query_groups, head_dim)
    rest = q.shape[1:]
    expected = {"q": num_heads * head_dim, "k": num_query_groups * head_dim, "v": num_query_groups * head_dim}
    for label, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.shape[0] != expected[label] or tensor.shape[1:] != rest:
            raise ValueError(
                f"{label} has shape {tuple(tensor.shape)}; expected ({expected[label]}, *{tuple(rest)}) "
                f"for {num_heads} heads in {num_query_groups} groups of head_dim {head_dim}."
            )
    fused = torch.cat(
        [
            q.reshape(num_query_groups, per_group * head_dim, *rest),
            k.reshape(num_query_groups, head_dim, *rest),
            v.reshape(num_query_groups, head_dim, *rest),
        ],
        dim=1,
    )
    return fused.reshape(num_query_groups * (per_group + 2) * head_dim, *rest)


def split_qkv_rows(
    fused: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv_rows`: megatron ``linear_qkv`` rows -> (q, k, v) rows.

    Works on the full fused tensor (the TP shards concatenated in rank order) or on any set
    of whole groups (then pass that set's head and group counts)."""
    per_group = _check_qkv_dims(num_heads, num_query_groups, head_dim)
    rows = num_query_groups * (per_group + 2) * head_dim
    if fused.shape[0] != rows:
        raise ValueError(
            f"fused qkv has {fused.shape[0]} rows; expected {rows} for {num_heads} heads in "
            f"{num_query_groups} groups of head_dim {head_dim}."
        )
    rest = fused.shape[1:]
    grouped = fused.reshape(num_query_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_heads * head_dim, *rest).contiguous(),
        k.reshape(num_query_groups * head_dim, *rest).contiguous(),
        v.reshape(num_query_groups * head_dim, *rest).contiguous(),
    )


def qkv_shard_row_ranges(
    num_heads: int, num_query_groups: int, head_dim: int, rank: int, size: int
) -> tuple[slice, slice, slice]:
    """The q, k and v row ranges that TP rank ``rank`` of ``size`` needs for its
    ``linear_qkv`` shard (its whole query groups); merge them with
    ``merge_qkv_rows(q, k, v, num_heads // size, num_query_groups // size, head_dim)``."""
    per_group = _check_qkv_dims(num_heads, num_query_groups, head_dim)
    if num_query_groups % size:
        raise ValueError(f"num_query_groups ({num_query_groups}) is not divisible by the TP size ({size}).")
    groups = num_query_groups // size
    first, last = rank * groups, (rank + 1) * groups
    q_rows = slice(first * per_group * head_dim, last * per_group * head_dim)
    kv_rows = slice(first * head_dim, last * head_dim)
    return q_rows, kv_rows, kv_rows


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """megatron's gated fc1 rows from HF ``gate_proj`` and ``up_proj`` rows: ``[gate; up]``.

    On full tensors this is the master weight (shard it with stride 2); on one rank's
    ``gate_i`` and ``up_i`` (rows :func:`contiguous_shard` of each) it is that rank's shard."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape.")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor, num_shards: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_gate_up`: (gate, up) rows from fc1 rows.

    ``num_shards`` is how many TP shards ``fc1`` concatenates in rank order
    (``[g_0; u_0; g_1; u_1; ...]``); use 1 for a master / stride-aware-gathered tensor."""
    if num_shards < 1 or fc1.shape[0] % (2 * num_shards):
        raise ValueError(f"fc1 with {fc1.shape[0]} rows does not split into {num_shards} [gate; up] shards.")
    chunks = fc1.chunk(2 * num_shards, dim=0)
    return torch.cat(chunks[0::2], dim=0).contiguous(), torch.cat(chunks[1::2], dim=0).contiguous()


def contiguous_shard(length: int, rank: int, size: int) -> slice:
    """The range of a dimension of ``length`` that rank ``rank`` of ``size`` holds (stride 1)."""
    if length % size:
        raise ValueError(f"a dimension of size {length} does not divide into {size} TP shards.")
    per_rank = length // size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _need_attention(attention: Optional[Attention]) -> Attention:
    if attention is None:
        raise ValueError("the qkv layout needs the attention geometry (heads, query groups, head_dim).")
    return attention


def merge_fused(layout: str, parts: Sequence[torch.Tensor], attention: Optional[Attention] = None) -> torch.Tensor:
    """megatron rows from the HF parts' rows in a family table's ``fused`` layout ("qkv"
    needs ``attention``: the heads and groups present in the parts)."""
    if layout == "qkv":
        return merge_qkv_rows(*parts, *_need_attention(attention))
    if layout == "gate_up":
        return merge_gate_up(*parts)
    (part,) = parts
    return part


def split_fused(
    layout: str, fused: torch.Tensor, attention: Optional[Attention] = None, num_shards: int = 1
) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`merge_fused` (``num_shards``: how many TP shards a gate_up tensor
    concatenates, see :func:`split_gate_up`)."""
    if layout == "qkv":
        return split_qkv_rows(fused, *_need_attention(attention))
    if layout == "gate_up":
        return split_gate_up(fused, num_shards)
    return (fused,)


def fused_shard_ranges(
    layout: str, part_rows: Sequence[int], attention: Optional[Attention], rank: int, size: int
) -> tuple[slice, ...]:
    """The rows of each HF part (of ``part_rows`` rows) that TP rank ``rank`` of ``size``
    needs for its shard; merge them with ``merge_fused(layout, parts, attention.shard(size))``."""
    if layout == "qkv":
        return qkv_shard_row_ranges(*_need_attention(attention), rank, size)
    return tuple(contiguous_shard(rows, rank, size) for rows in part_rows)
