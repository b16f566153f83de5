"""Core attention for dist_lora's megatron block spec, on ``torch.nn.functional.scaled_dot_product_attention``.

megatron's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix and
repeats K/V for grouped-query attention. This module hands the same computation to PyTorch's
SDPA, which picks the flash / memory-efficient kernels on a GPU (nothing but torch needed) and
the math kernel on a CPU:

    out = softmax(q kᵀ · scale + mask) v        q [b, n_heads, s, d], k, v [b, n_groups, s, d]

with ``enable_gqa`` so K/V keep their ``n_groups`` heads in memory (torch < 2.5 lacks it: K/V
are repeated, with one warning). The inputs are this TP rank's heads and groups in megatron's
[s, b, heads, d] layout (sequence-gathered under SP, as for megatron's own core attention);
the output is [s, b, heads·d], the shape ``linear_proj`` expects.

Masks: ``attention_mask=None`` means causal (SDPA's ``is_causal``); a boolean mask in
megatron's convention ([b or 1, 1, s, s], True = may NOT attend) is passed as SDPA's allow-mask
(its negation), e.g. the block-diagonal causal mask of packed samples (``dist_lora.data``).
Attention dropout draws from megatron's model-parallel RNG tracker when the heads are split
over TP without SP, as megatron's core attention does.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

_GQA_FALLBACK_WARNED = False


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by the tensor-parallel size ({b}).")
    return a // b


class SDPAttention(MegatronModule):
    """A drop-in for megatron's ``DotProductAttention`` (same constructor and forward)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            "context_parallel_size": config.context_parallel_size != 1,
            "window_size": config.window_size is not None,
            "softmax_type": getattr(config, "softmax_type", "vanilla") != "vanilla",
        }
        if any(unsupported.values()):
            names = ", ".join(k for k, v in unsupported.items() if v)
            raise ValueError(f"SDPA attention does not support {names}; use model.attention: megatron.")
        tp = config.tensor_model_parallel_size
        self.attn_mask_type = attn_mask_type
        self.heads = _divide(config.num_attention_heads, tp, "num_attention_heads")
        self.groups = _divide(config.num_query_groups or config.num_attention_heads, tp, "num_query_groups")
        head_dim = config.kv_channels
        # megatron's apply_query_key_layer_scaling divides the scale by the layer number and
        # multiplies it back inside its softmax: the net scale is the same
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPA attention takes a boolean attention_mask, not attention_bias / packed_seq_params.")
        s, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        causal = attention_mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        allowed = None if attention_mask is None else ~attention_mask
        p = self.dropout if self.training else 0.0
        if p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._sdpa(q, k, v, allowed, causal, p)
        else:
            out = self._sdpa(q, k, v, allowed, causal, p)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * q.shape[-1])

    def _sdpa(self, q, k, v, allowed, causal: bool, p: float) -> torch.Tensor:
        kwargs = dict(attn_mask=allowed, dropout_p=p, is_causal=causal, scale=self.scale)
        if self.groups == self.heads:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        try:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        except TypeError:  # torch < 2.5: no enable_gqa
            global _GQA_FALLBACK_WARNED
            if not _GQA_FALLBACK_WARNED:
                warnings.warn("this torch's SDPA has no enable_gqa: K/V are repeated per query head (torch >= 2.5 avoids it).")
                _GQA_FALLBACK_WARNED = True
            repeat = self.heads // self.groups
            return F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), **kwargs)


def with_sdpa_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a transformer-layer spec whose self-attention uses :class:`SDPAttention`."""
    attention = layer_spec.submodules.self_attention
    inner = dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    submodules = dataclasses.replace(layer_spec.submodules, self_attention=dataclasses.replace(attention, submodules=inner))
    return dataclasses.replace(layer_spec, submodules=submodules)
