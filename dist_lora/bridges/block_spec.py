"""megatron's local GPT block spec (no apex / Transformer Engine) with torch norms, sequence parallel too.

Without apex or TE, megatron's local spec builds ``WrappedTorchNorm``, which asserts
``not config.sequence_parallel``. The norms here take megatron's construction signature
``(config, hidden_size, eps)`` and, like apex's ``FusedLayerNorm``, tag their parameters
``sequence_parallel = config.sequence_parallel``: under SP each TP rank normalises only its
sequence chunk, so their gradients are per-rank partial sums that must be summed over TP once
per step (megatron's ``finalize_model_grads`` does it for tagged params). State-dict keys are
unchanged (``input_layernorm.weight``, ...).

With ``config.qk_layernorm`` (Qwen3) the attention's ``q_layernorm`` / ``k_layernorm`` are
:class:`HeadRMSNorm`: an RMSNorm over the last (head) dimension of this rank's query / key
heads [s, b, heads_i, head_dim], with ``config.layernorm_epsilon``. They act on heads, not on
the sequence (attention sees the whole sequence even under SP), so they carry no
``sequence_parallel`` tag. Their weight w [head_dim] is shared by all heads, so
∂L/∂w = Σ_h Σ_tokens ∂L/∂y_h ⊙ x̂_h sums over every head h; with the heads split over TP,
rank i's gradient is the partial sum over its own heads and the full one is the sum over TP.
The parameters are tagged ``head_norm_partial_grad`` when TP > 1
(:func:`dist_lora.parallel.grads.mark_head_norm_partial_grads`), so that a trainable copy
(``modules_to_save``) is summed over TP once per step like the other partial gradients.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from ..parallel.grads import mark_head_norm_partial_grads
from .attention import with_sdpa_attention


def _check_config(config: TransformerConfig) -> None:
    if config.layernorm_zero_centered_gamma:
        raise ValueError("layernorm_zero_centered_gamma is not supported by the torch norms.")


def _tag_sequence_parallel(norm: torch.nn.Module, config: TransformerConfig) -> None:
    _check_config(config)
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


class HeadRMSNorm(torch.nn.RMSNorm):
    """The q/k norm of ``qk_layernorm``: ``torch.nn.RMSNorm`` over head_dim, applied to each of
    this rank's heads, y = x / sqrt(mean(x², last dim) + eps) · w with one w [head_dim] shared by
    all heads. Built like a megatron norm ``(config, hidden_size=head_dim, eps)``; never tagged
    sequence parallel; tagged ``head_norm_partial_grad`` when TP > 1 (heads split)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        _check_config(config)
        super().__init__(hidden_size, eps=eps, **_factory(config))
        mark_head_norm_partial_grads(self.parameters(), config.tensor_model_parallel_size > 1)


def norm_class(config: TransformerConfig) -> type[torch.nn.Module]:
    """The norm class for ``config.normalization`` ("RMSNorm" or "LayerNorm")."""
    classes: dict[str, type[torch.nn.Module]] = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}
    if config.normalization not in classes:
        raise ValueError(f"normalization {config.normalization!r} is not one of {sorted(classes)}.")
    return classes[config.normalization]


def _swap_wrapped_norms(submodules, norm: type[torch.nn.Module]):
    """A copy of a spec's submodules dataclass whose ``WrappedTorchNorm`` fields are ``norm``."""
    swapped = {
        field.name: norm
        for field in dataclasses.fields(submodules)
        if getattr(submodules, field.name) is WrappedTorchNorm
    }
    return dataclasses.replace(submodules, **swapped)


def _replace_norms(layer_spec: ModuleSpec, norm: type[torch.nn.Module]) -> ModuleSpec:
    """A copy of a transformer-layer spec whose ``WrappedTorchNorm``s are ``norm`` (the layer's
    own: input_layernorm, pre_mlp_layernorm, ...) and :class:`HeadRMSNorm` (attention's
    q_layernorm / k_layernorm, present with ``qk_layernorm=True``)."""
    submodules = _swap_wrapped_norms(layer_spec.submodules, norm)
    attention = submodules.self_attention
    if isinstance(attention, ModuleSpec) and dataclasses.is_dataclass(attention.submodules):
        if norm is not RMSNorm and WrappedTorchNorm in vars(attention.submodules).values():
            raise ValueError("qk_layernorm is supported with normalization='RMSNorm' only.")
        inner = _swap_wrapped_norms(attention.submodules, HeadRMSNorm)
        submodules = dataclasses.replace(submodules, self_attention=dataclasses.replace(attention, submodules=inner))
    return dataclasses.replace(layer_spec, submodules=submodules)


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
