"""Hugging Face Llama-family ``config.json`` -> the facts megatron's GPTModel needs.

Supported: ``LlamaForCausalLM`` (llama), ``MistralForCausalLM`` (mistral), ``Qwen2ForCausalLM``
(qwen2, q/k/v biases), ``Qwen3ForCausalLM`` (qwen3, q/k RMSNorm over head_dim: megatron's
``qk_layernorm``, eps ``rms_norm_eps`` as every norm), ``MixtralForCausalLM`` (mixtral,
mixture of experts) and ``Qwen3MoeForCausalLM`` (qwen3_moe: Qwen3 attention, mixture of
experts, ``decoder_sparse_step`` / ``mlp_only_layers`` as megatron's ``moe_layer_freq``);
their tables are in :mod:`.families`.
All are pre-norm decoders with RMSNorm, SwiGLU, grouped-query attention and rotate-half RoPE,
which megatron's GPTModel computes with::

    normalization="RMSNorm", gated_linear_unit=True, activation silu, add_bias_linear=False,
    add_qkv_bias (qwen2), qk_layernorm (qwen3), kv_channels=head_dim, position_embedding_type="rope"

All use the non-interleaved ("rotate half") RoPE layout, so q/k rows need no permutation.

Restrictions (each raises :class:`UnsupportedCheckpointError` before any process-group work):
``num_query_groups`` and ``num_attention_heads`` divisible by TP (megatron 0.16 can replicate
kv heads when groups < TP, at the price of an all-gather of the QKV output per layer: not
supported here), ``vocab_size`` divisible by TP (no vocab padding: padded logits would change
the softmax), RoPE types ``default``, ``linear`` and ``llama3`` (the latter only with megatron's
fixed low/high frequency factors 1/4 and original context 8192), no sliding-window attention.
Mixture-of-experts facts, router settings and refusals: :mod:`.moe_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .errors import UnsupportedCheckpointError
from .families import FAMILIES, family_of
from .layouts import Attention
from .moe_config import check_expert_layout, check_moe_variant, moe_config_fields, parse_moe
from .table import ModelFamily

if TYPE_CHECKING:  # megatron is imported lazily: names and layouts work without it
    from megatron.core.transformer import TransformerConfig

SUPPORTED_ARCHITECTURES = {family.model_type: family.architecture for family in FAMILIES.values()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# megatron's RotaryEmbedding(rope_scaling=True) hardcodes these llama3 parameters.
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Geometry fields an HF config may leave out, computed from those read before them.
_GEOMETRY_DEFAULTS = {
    "num_query_groups": lambda g: g["num_attention_heads"],
    "head_dim": lambda g: g["hidden_size"] // g["num_attention_heads"],
}


@dataclasses.dataclass(frozen=True)
class HFLlamaArch:
    """The facts of a supported HF config that the megatron model needs (validated)."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    rotary_base: float
    rope_scaling: bool  # megatron's llama3 frequency scaling
    rope_scaling_factor: float
    seq_len_interpolation_factor: float | None  # HF "linear" RoPE scaling
    num_experts: int = 0  # 0: a dense model (the fields below are unused)
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing probabilities to sum 1
    moe_aux_loss_coeff: float = 0.0
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or a dense MLP

    @property
    def family(self) -> ModelFamily:
        return family_of(self.model_type)

    @property
    def attention(self) -> Attention:
        """The attention geometry of the whole model (for the fused QKV layout)."""
        return Attention(self.num_attention_heads, self.num_query_groups, self.head_dim)


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of an HF checkpoint directory as a dict."""
    path = os.path.join(os.fspath(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a Hugging Face checkpoint directory.")
    with open(path) as f:
        return json.load(f)


def _as_dict(hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):  # a transformers PretrainedConfig
        return hf_config.to_dict()
    raise TypeError(
        f"hf_config must be a dict (config.json) or a transformers config, not {type(hf_config).__name__}."
    )


def _supported() -> str:
    return ", ".join(f"{arch} (model_type {mt!r})" for mt, arch in SUPPORTED_ARCHITECTURES.items())


def _parse_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from transformers >= 5 ``rope_parameters`` or older ``rope_theta`` +
    ``rope_scaling``."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
    elif not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedCheckpointError(f"per-layer-type rope_parameters are not supported: {params!r}.")
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise UnsupportedCheckpointError(f"partial_rotary_factor={partial} is not supported (only 1.0).")
    rope = dict(rotary_base=theta, rope_scaling=False, rope_scaling_factor=8.0, seq_len_interpolation_factor=None)
    if rope_type == "default":
        return rope
    if rope_type == "linear":
        return {**rope, "seq_len_interpolation_factor": float(params["factor"])}
    if rope_type == "llama3":
        differing = {
            key: params.get(key) for key, want in _MEGATRON_LLAMA3_ROPE.items() if float(params.get(key, -1)) != want
        }
        if differing:
            raise UnsupportedCheckpointError(
                f"llama3 RoPE scaling with {differing} is not supported: megatron's RotaryEmbedding "
                f"hardcodes {_MEGATRON_LLAMA3_ROPE}."
            )
        return {**rope, "rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    raise UnsupportedCheckpointError(
        f"RoPE type {rope_type!r} is not supported; supported types: {', '.join(SUPPORTED_ROPE_TYPES)} "
        "(dynamic, yarn, longrope, ... are not implemented)."
    )


def _family(hf: dict[str, Any]) -> ModelFamily:
    model_type = hf.get("model_type")
    check_moe_variant(hf, _supported())
    if model_type not in FAMILIES:
        raise UnsupportedCheckpointError(
            f"model_type {model_type!r} is not supported by the Llama-family bridge; supported: {_supported()}."
        )
    family = family_of(model_type)
    architectures = hf.get("architectures") or [family.architecture]
    if list(architectures) != [family.architecture]:
        raise UnsupportedCheckpointError(
            f"architectures {architectures} are not supported for model_type {model_type!r}; "
            f"supported: {_supported()}."
        )
    return family


def _check_features(family: ModelFamily, hf: dict[str, Any], max_positions: int) -> None:
    """Refuse activations, biases and attention windows megatron's local spec would compute differently."""
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedCheckpointError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only 'silu').")
    if hf.get("mlp_bias"):
        raise UnsupportedCheckpointError("mlp_bias=True is not supported (megatron would need add_bias_linear).")
    if not family.qkv_bias and hf.get("attention_bias"):
        raise UnsupportedCheckpointError(
            "attention_bias=True (biases on q/k/v AND o_proj) is not supported; megatron's add_qkv_bias "
            "covers q/k/v only."
        )
    layer_types = hf.get("layer_types") or []
    if family.sliding_window_flag and hf.get(family.sliding_window_flag):
        layer_types = ["sliding_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedCheckpointError(
            "sliding-window attention layers are not supported (megatron's local attention is fully causal)."
        )
    window = hf.get(family.sliding_window_size) if family.sliding_window_size else None
    if window is not None and window < max_positions:
        raise UnsupportedCheckpointError(
            f"{family.sliding_window_size}={window} < max_position_embeddings={max_positions} is not supported: "
            "megatron's local attention is fully causal, so sequences longer than the window would differ."
        )


def _geometry(family: ModelFamily, hf: dict[str, Any]) -> dict[str, int]:
    """The family's geometry fields (``config_fields``) read from the HF config; a missing
    required one raises KeyError naming it."""
    geometry: dict[str, int] = {}
    for field, key, _ in family.config_fields:
        value = hf.get(key)
        if not value and field in family.config_defaults:
            value = family.config_defaults[field]
        elif not value:
            value = _GEOMETRY_DEFAULTS[field](geometry) if field in _GEOMETRY_DEFAULTS else hf[key]
        geometry[field] = int(value)
    return geometry


def parse_hf_config(hf_config: Mapping[str, Any] | Any) -> HFLlamaArch:
    """Validate an HF config (``config.json`` dict or transformers config) of a supported
    architecture and return its facts; raises :class:`UnsupportedCheckpointError`."""
    hf = _as_dict(hf_config)
    family = _family(hf)
    max_positions = int(hf.get("max_position_embeddings", 2048))
    _check_features(family, hf, max_positions)
    geometry = _geometry(family, hf)
    return HFLlamaArch(
        model_type=family.model_type,
        **geometry,
        **parse_moe(family, hf, geometry["num_layers"]),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=max_positions,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=family.qkv_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_parse_rope(hf),
    )


def check_parallel_layout(
    arch: HFLlamaArch, tp: int, pp: int, ep: int = 1, etp: int | None = None, sequence_parallel: bool = False
) -> None:
    """Raise :class:`UnsupportedCheckpointError` if the model cannot be split at TP=tp, PP=pp,
    expert-parallel EP=ep and expert-tensor-parallel ETP=etp (None: megatron's default, TP)."""
    etp = tp if etp is None else etp
    if min(tp, pp, ep, etp) < 1:
        raise UnsupportedCheckpointError(f"tp ({tp}), pp ({pp}), ep ({ep}) and etp ({etp}) must be >= 1.")
    check_expert_layout(arch, tp, ep, etp, sequence_parallel)
    problems = [
        f"{label} ({value}) is not divisible by the tensor-parallel size {tp}"
        for label, value in (
            ("num_attention_heads", arch.num_attention_heads),
            ("num_key_value_heads (query groups)", arch.num_query_groups),
            ("vocab_size", arch.vocab_size),
            ("intermediate_size", arch.ffn_hidden_size if not arch.num_experts or not all(arch.moe_layers) else tp),
        )
        if value % tp
    ]
    if arch.num_attention_heads % arch.num_query_groups:
        problems.append(
            f"num_attention_heads ({arch.num_attention_heads}) is not a multiple of num_key_value_heads "
            f"({arch.num_query_groups})"
        )
    if arch.num_layers < pp:
        problems.append(f"num_hidden_layers ({arch.num_layers}) is smaller than the pipeline-parallel size {pp}")
    if problems:
        raise UnsupportedCheckpointError(
            f"this {arch.model_type} checkpoint cannot be built at TP={tp}, PP={pp}: " + "; ".join(problems) + "."
        )


def transformer_config_from_hf(
    hf_config: Mapping[str, Any] | Any,
    tp: int = 1,
    pp: int = 1,
    sequence_parallel: bool = False,
    ep: int = 1,
    etp: int | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """megatron's TransformerConfig for an HF config of a supported family at TP=tp, PP=pp
    (and for a mixture of experts EP=ep, ETP=etp: :func:`moe_config_fields`).

    fp32 params, CPU initialisation, no dropout, ``perform_initialization=False`` (the weights
    are loaded, not drawn). ``overrides`` are TransformerConfig fields applied last (e.g.
    ``params_dtype=torch.bfloat16``; ``pipeline_dtype`` follows ``params_dtype`` unless given).
    RoPE settings are GPTModel arguments, not config fields: see :func:`gpt_model_kwargs_from_hf`.
    """
    from megatron.core.transformer import TransformerConfig  # megatron (heavy) is imported on use

    arch = parse_hf_config(hf_config)
    check_parallel_layout(arch, tp, pp, ep, etp, sequence_parallel)
    family = arch.family
    fields: dict[str, Any] = {megatron: getattr(arch, field) for field, _, megatron in family.config_fields}
    fields.update(
        family.megatron_config,
        layernorm_epsilon=arch.rms_norm_eps,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        **moe_config_fields(arch, ep, etp),
    )
    if overrides.get("moe_grouped_gemm"):
        raise UnsupportedCheckpointError(
            "moe_grouped_gemm=True is not supported: the bridge loads megatron's SequentialMLP experts "
            "(local_experts.J.linear_fc1 / linear_fc2), not grouped-GEMM weights."
        )
    fields.update(overrides)
    fields.setdefault("pipeline_dtype", fields["params_dtype"])
    return TransformerConfig(**fields)


def gpt_model_kwargs_from_hf(hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The GPTModel constructor arguments (besides config, spec and PP stage flags)."""
    arch = parse_hf_config(hf_config)
    return dict(
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,
        rope_scaling=arch.rope_scaling,
        rope_scaling_factor=arch.rope_scaling_factor,
        seq_len_interpolation_factor=arch.seq_len_interpolation_factor,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
    )


def megatron_geometry_mismatch(config: Any, arch: HFLlamaArch) -> list[str]:
    """The geometry fields (and the q/k norm switch ``qk_layernorm``) in which a megatron
    TransformerConfig differs from a parsed HF config, as ``"<megatron field> <value> (HF: <value>)"``."""
    defaults = {  # megatron fills these in when a config leaves them None
        "num_query_groups": config.num_attention_heads,
        "kv_channels": config.hidden_size // config.num_attention_heads,
    }
    differing = []
    for field, _, megatron in arch.family.config_fields:
        have, want = getattr(config, megatron), getattr(arch, field)
        if not have and megatron in defaults:
            have = defaults[megatron]
        if have != want:
            differing.append(f"{megatron} {have} (HF: {want})")
    qk_norm = bool(arch.family.megatron_config.get("qk_layernorm", False))
    if bool(getattr(config, "qk_layernorm", False)) != qk_norm:
        differing.append(f"qk_layernorm {not qk_norm} (HF: {qk_norm})")
    return differing
