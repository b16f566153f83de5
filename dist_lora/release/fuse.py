"""Fuse the adapters of HF q/k/v (gate/up) modules into one megatron linear_qkv (linear_fc1) adapter.

A fused module's adapter must compute ``Σ_i s_i B_i A_i x`` on the rows of part i. Two exact
layouts (parts absent from the file have B_i = 0 and, for lora_bias, a zero bias):

* **shared** -- every present part has the *same* A (``torch.equal``) and the same scaling
  (what ``consolidate`` writes for a fused megatron adapter): A' = A, B' = the parts' B rows
  merged, rank r and alpha unchanged. No arithmetic: a PEFT file written by ``consolidate``
  round-trips bit for bit.
* **stacked** -- otherwise (PEFT's q/k/v have independent A's; or the ranks/alphas differ):
  R = Σ r_i over present parts, A' = [A_q; A_k; A_v] (rows stacked, absent parts add none),
  part i's B rows are ``[0 .. B_i·c_i .. 0]`` (its r_i columns at its offset) with
  c_i = s_i / s_f, then merged. Then s_f B'A' = Σ_i s_i B_i A_i on each part's rows. The fused
  scale s_f: when all present parts share one scaling s and an alpha with
  ``lora_scaling(alpha, R) == s`` exists (alpha = s·R, or s·sqrt(R) with rsLoRA, checked
  exactly in float), s_f = s and B is copied unscaled; else alpha = R (sqrt(R) with rsLoRA),
  so s_f = 1 exactly and each block is pre-multiplied by its s_i (in fp32).
  lora_B.bias rows follow the same rule (they are scaled by s like B h).

The rows are merged with the bridge's own layout functions (:func:`dist_lora.bridges.merge_fused`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterable, Optional

import torch

from ..bridges import HF_LAYERS, HFLlamaArch, Mapped, hf_features, merge_fused, split_layer_name
from ..layers.math import lora_scaling


@dataclasses.dataclass
class Part:
    """One HF module's adapter from the file."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    bias: Optional[torch.Tensor]
    r: int
    alpha: float
    scale: float


@dataclasses.dataclass(frozen=True)
class FusedFactors:
    """The full (unsharded, TP=1 layout) factors of one megatron module's adapter."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    bias: Optional[torch.Tensor]  # [out] with lora_bias
    r: int
    lora_alpha: float
    layout: str  # "single" (o_proj/down_proj), "shared" or "stacked" (see the module docstring)
    parts: tuple[str, ...]  # the HF modules it holds, in fused order


def fuse(mapped: Mapped, parts: dict[int, Part], arch: HFLlamaArch, rslora: bool) -> FusedFactors:
    """One megatron module's factors from its HF parts' (``parts``: position in the fused
    module -> part; see the module docstring)."""
    names = tuple(parts[i].module for i in sorted(parts))
    if len(mapped.hf) == 1:
        p = parts[0]
        return FusedFactors(p.a, p.b, p.bias, p.r, p.alpha, "single", names)
    features = hf_features(arch.family, arch)
    out_dims = [features[split_layer_name(hf, HF_LAYERS)[1]][1] for hf in mapped.hf]
    present = [parts[i] for i in sorted(parts)]
    first = present[0]
    shared = all(torch.equal(p.a, first.a) and p.scale == first.scale for p in present[1:]) and all(
        p.a.dtype == first.a.dtype for p in present
    )
    if shared:
        rank, alpha, s_f = first.r, first.alpha, first.scale
        a, layout = first.a, "shared"
        offsets = {i: 0 for i in parts}
    else:
        rank = sum(p.r for p in present)
        alpha, s_f = _fused_alpha(present, rank, rslora)
        a = torch.cat([p.a.to(_common_dtype(p.a for p in present)) for p in present], dim=0)
        layout, offsets, offset = "stacked", {}, 0
        for i in sorted(parts):
            offsets[i], offset = offset, offset + parts[i].r
    folded = any(p.scale != s_f for p in present)
    dtype = torch.float32 if folded else _common_dtype(p.b for p in present)
    dtype = torch.promote_types(dtype, _common_dtype(p.b for p in present))

    def blocks(get: Callable[[Part], Optional[torch.Tensor]]) -> list[torch.Tensor]:
        out = []
        for i, rows in enumerate(out_dims):
            part = parts.get(i)
            tensor = None if part is None else get(part)
            shape = (rows, rank) if get is _b else (rows,)
            if tensor is None:
                out.append(torch.zeros(shape, dtype=dtype))
                continue
            value = tensor.to(dtype)
            if part.scale != s_f:
                value = value * (part.scale / s_f)
            if get is _b and layout == "stacked":
                block = torch.zeros(shape, dtype=dtype)
                block[:, offsets[i] : offsets[i] + part.r] = value
                value = block
            out.append(value)
        return out

    b = merge_fused(mapped.entry.fused, blocks(_b), arch.attention)
    bias = merge_fused(mapped.entry.fused, blocks(_bias), arch.attention) if first.bias is not None else None
    return FusedFactors(a.contiguous(), b.contiguous(), bias, rank, alpha, layout, names)


def _b(part: Part) -> torch.Tensor:
    return part.b


def _bias(part: Part) -> Optional[torch.Tensor]:
    return part.bias


def _common_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _tidy(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _fused_alpha(present: list[Part], rank: int, rslora: bool) -> tuple[float, float]:
    """(alpha, scaling) of a stacked fused adapter of rank ``rank``: the parts' common scaling
    when an alpha reproduces it exactly, else 1 (alpha = rank, or sqrt(rank) with rsLoRA)."""
    norm = math.sqrt(rank) if rslora else rank
    scales = {p.scale for p in present}
    if len(scales) == 1:
        scale = scales.pop()
        alpha = _tidy(scale * norm)
        if lora_scaling(alpha, rank, rslora) == scale:
            return alpha, scale
    alpha = _tidy(norm)
    return alpha, lora_scaling(alpha, rank, rslora)  # x / x: exactly 1.0
