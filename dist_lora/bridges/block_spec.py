"""megatron's local GPT block spec (no apex / Transformer Engine) with torch norms, sequence parallel too.

Without apex or TE, megatron's local spec builds ``WrappedTorchNorm``, which asserts
``not config.sequence_parallel``. The norms here take megatron's construction signature
``(config, hidden_size, eps)`` and, like apex's ``FusedLayerNorm``, tag their parameters
``sequence_parallel = config.sequence_parallel``: under SP each TP rank normalises only its
sequence chunk, so their gradients are per-rank partial sums that must be summed over TP once
per step (megatron's ``finalize_model_grads`` does it for tagged params). State-dict keys are
unchanged (``input_layernorm.weight``, ...).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from .attention import with_sdpa_attention


def _tag_sequence_parallel(norm: torch.nn.Module, config: TransformerConfig) -> None:
    if config.layernorm_zero_centered_gamma:
        raise ValueError("layernorm_zero_centered_gamma is not supported by the torch norms.")
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel


def _factory(config: TransformerConfig) -> dict:
    """Where and in which dtype megatron creates this rank's parameters (its params_dtype, on the
    CPU or the current GPU), for the norms' parameters too."""
    device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
    return {"dtype": config.params_dtype, "device": device}


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built like a megatron norm; params tagged for sequence parallel."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps, **_factory(config))
        _tag_sequence_parallel(self, config)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` built like a megatron norm; params tagged for sequence parallel."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps, **_factory(config))
        _tag_sequence_parallel(self, config)


def norm_class(config: TransformerConfig) -> type[torch.nn.Module]:
    """The norm class for ``config.normalization`` ("RMSNorm" or "LayerNorm")."""
    classes: dict[str, type[torch.nn.Module]] = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}
    if config.normalization not in classes:
        raise ValueError(f"normalization {config.normalization!r} is not one of {sorted(classes)}.")
    return classes[config.normalization]


def _replace_norms(layer_spec: ModuleSpec, norm: type[torch.nn.Module]) -> ModuleSpec:
    """A copy of a transformer-layer spec whose layer-level ``WrappedTorchNorm``s are ``norm``.

    Only the layer's own fields (input_layernorm, pre_mlp_layernorm, ...) are replaced; the
    q/k norms inside attention (``qk_layernorm=True``) are left as megatron builds them.
    """
    submodules = layer_spec.submodules
    swapped = {
        field.name: norm
        for field in dataclasses.fields(submodules)
        if getattr(submodules, field.name) is WrappedTorchNorm
    }
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(submodules, **swapped))


def _layer_spec(spec: ModuleSpec, norm: type[torch.nn.Module], attention: str) -> ModuleSpec:
    spec = _replace_norms(spec, norm)
    return with_sdpa_attention(spec) if attention == "sdpa" else spec


def gpt_local_block_spec(
    config: TransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None, attention: str = "megatron"
) -> TransformerBlockSubmodules:
    """megatron's local GPT decoder block spec (this pipeline stage's layers) with the torch
    norms above in every layer and as the final norm, and with ``attention="sdpa"`` dist_lora's
    SDPA core attention (:mod:`.attention`). Pass it to ``GPTModel`` as ``transformer_layer_spec``."""
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=False,
        normalization=config.normalization,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    norm = norm_class(config)
    return dataclasses.replace(
        block,
        layer_specs=[_layer_spec(spec, norm, attention) for spec in block.layer_specs],
        layer_norm=norm,
    )
