"""Hugging Face Llama-family checkpoints <-> megatron-core GPTModel (local spec).

Supported: ``LlamaForCausalLM`` (llama), ``MistralForCausalLM`` (mistral), ``Qwen2ForCausalLM``
(qwen2, q/k/v biases). All are pre-norm decoders with RMSNorm, SwiGLU, grouped-query attention
and rotate-half RoPE, which megatron's GPTModel computes with::

    normalization="RMSNorm", gated_linear_unit=True, activation silu, add_bias_linear=False,
    add_qkv_bias (qwen2), kv_channels=head_dim, position_embedding_type="rope"

Both use the non-interleaved ("rotate half") RoPE layout, so q/k rows need no permutation.

Weight mapping (HF ``model.layers.N.`` -> megatron ``decoder.layers.n.``, n local to the PP
stage, N = ``layer.layer_number - 1``), t = TP size, i = TP rank:

=========================================  ==================================  ===================
HF                                         megatron                            this rank reads
=========================================  ==================================  ===================
model.embed_tokens                         embedding.word_embeddings           vocab rows i (dim 0)
self_attn.{q,k,v}_proj (+ bias, qwen2)     self_attention.linear_qkv           whole query groups i
self_attn.o_proj                           self_attention.linear_proj          columns i (dim 1)
input_layernorm                            input_layernorm                     all
post_attention_layernorm                   pre_mlp_layernorm                   all
mlp.{gate,up}_proj                         mlp.linear_fc1 = [gate_i; up_i]     rows i of each
mlp.down_proj                              mlp.linear_fc2                      columns i (dim 1)
model.norm                                 decoder.final_layernorm             all
lm_head (embed_tokens when tied)           output_layer                        vocab rows i (dim 0)
=========================================  ==================================  ===================

The fused layouts are in :mod:`dist_lora.bridges.layouts` (one implementation, used both here
and by the consolidation of fused LoRA factors). Each rank reads only its slices of the
tensors of its own pipeline stage (:class:`~dist_lora.bridges.checkpoint_reader.CheckpointReader`).

Restrictions (each raises :class:`UnsupportedCheckpointError` before any process-group work):
``num_query_groups`` and ``num_attention_heads`` divisible by TP (megatron 0.16 can replicate
kv heads when groups < TP, at the price of an all-gather of the QKV output per layer: not
supported here), ``vocab_size`` divisible by TP (no vocab padding: padded logits would change
the softmax), RoPE types ``default``, ``linear`` and ``llama3`` (the latter only with megatron's
fixed low/high frequency factors 1/4 and original context 8192), no sliding-window attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from .checkpoint_reader import CheckpointReader
from .layouts import contiguous_shard, merge_gate_up, merge_qkv_rows, qkv_shard_row_ranges

if TYPE_CHECKING:  # megatron is imported lazily: names and layouts work without it
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# megatron's RotaryEmbedding(rope_scaling=True) hardcodes these llama3 parameters.
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class UnsupportedCheckpointError(ValueError):
    """The HF checkpoint's architecture, a feature of it, or the requested parallel layout is
    not supported by this bridge; the message says which and what is supported."""


# ---------------------------------------------------------------------------------------------
# Config


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


def parse_hf_config(hf_config: Mapping[str, Any] | Any) -> HFLlamaArch:
    """Validate an HF config (``config.json`` dict or transformers config) of a supported
    architecture and return its facts; raises :class:`UnsupportedCheckpointError`."""
    hf = _as_dict(hf_config)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"model_type {model_type!r} is not supported by the Llama-family bridge; supported: {_supported()}."
        )
    architectures = hf.get("architectures") or [SUPPORTED_ARCHITECTURES[model_type]]
    if list(architectures) != [SUPPORTED_ARCHITECTURES[model_type]]:
        raise UnsupportedCheckpointError(
            f"architectures {architectures} are not supported for model_type {model_type!r}; "
            f"supported: {_supported()}."
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedCheckpointError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only 'silu').")
    if hf.get("mlp_bias"):
        raise UnsupportedCheckpointError("mlp_bias=True is not supported (megatron would need add_bias_linear).")
    if model_type == "qwen2":
        qkv_bias = True
    else:
        if hf.get("attention_bias"):
            raise UnsupportedCheckpointError(
                "attention_bias=True (biases on q/k/v AND o_proj) is not supported; megatron's add_qkv_bias "
                "covers q/k/v only."
            )
        qkv_bias = False
    layer_types = hf.get("layer_types") or []
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        layer_types = ["sliding_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        raise UnsupportedCheckpointError(
            "sliding-window attention layers are not supported (megatron's local attention is fully causal)."
        )
    window = hf.get("sliding_window") if model_type == "mistral" else None
    max_positions = int(hf.get("max_position_embeddings", 2048))
    if window is not None and window < max_positions:
        raise UnsupportedCheckpointError(
            f"sliding_window={window} < max_position_embeddings={max_positions} is not supported: megatron's "
            "local attention is fully causal, so sequences longer than the window would differ."
        )
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
    rope = _parse_rope(hf)
    return HFLlamaArch(
        model_type=model_type,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=max_positions,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **rope,
    )


def check_parallel_layout(arch: HFLlamaArch, tp: int, pp: int) -> None:
    """Raise :class:`UnsupportedCheckpointError` if the model cannot be split at TP=tp, PP=pp."""
    if tp < 1 or pp < 1:
        raise UnsupportedCheckpointError(f"tp ({tp}) and pp ({pp}) must be >= 1.")
    problems = [
        f"{label} ({value}) is not divisible by the tensor-parallel size {tp}"
        for label, value in (
            ("num_attention_heads", arch.num_attention_heads),
            ("num_key_value_heads (query groups)", arch.num_query_groups),
            ("vocab_size", arch.vocab_size),
            ("intermediate_size", arch.ffn_hidden_size),
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
    **overrides: Any,
) -> TransformerConfig:
    """megatron's TransformerConfig for an HF Llama / Mistral / Qwen2 config at TP=tp, PP=pp.

    fp32 params, CPU initialisation, no dropout, ``perform_initialization=False`` (the weights
    are loaded, not drawn). ``overrides`` are TransformerConfig fields applied last (e.g.
    ``params_dtype=torch.bfloat16``; ``pipeline_dtype`` follows ``params_dtype`` unless given).
    RoPE settings are GPTModel arguments, not config fields: see :func:`gpt_model_kwargs_from_hf`.
    """
    from megatron.core.transformer import TransformerConfig

    arch = parse_hf_config(hf_config)
    check_parallel_layout(arch, tp, pp)
    fields: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
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


# ---------------------------------------------------------------------------------------------
# Module names

# megatron submodule of ``decoder.layers.N`` -> HF submodules of ``model.layers.N``, and how the
# weight is split over TP ("qkv": whole query groups, "gate_up": [gate_i; up_i], "row": input
# columns, "norm": replicated).
_LAYER_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "input_layernorm": (("input_layernorm",), "norm"),
    "self_attention.linear_qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
    "self_attention.linear_proj": (("self_attn.o_proj",), "row"),
    "pre_mlp_layernorm": (("post_attention_layernorm",), "norm"),
    "mlp.linear_fc1": (("mlp.gate_proj", "mlp.up_proj"), "gate_up"),
    "mlp.linear_fc2": (("mlp.down_proj",), "row"),
}
# Model-level modules ("vocab": vocab rows).
_MODEL_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "embedding.word_embeddings": (("model.embed_tokens",), "vocab"),
    "decoder.final_layernorm": (("model.norm",), "norm"),
    "output_layer": (("lm_head",), "vocab"),
}
# megatron's tensor-parallel markers (partition dim, stride) per split kind.
_TP_ATTRIBUTES = {"qkv": (0, 1), "gate_up": (0, 2), "row": (1, 1), "vocab": (0, 1)}

_MEGATRON_NAME = re.compile(
    r"(?:.*\.)?(?:decoder\.layers\.(?P<layer>\d+)\.(?P<sub>"
    + "|".join(map(re.escape, _LAYER_MODULES))
    + r")|(?P<top>"
    + "|".join(map(re.escape, _MODEL_MODULES))
    + r"))"
)
_HF_LAYER_MODULES = {hf: (sub, k) for sub, (hfs, _) in _LAYER_MODULES.items() for k, hf in enumerate(hfs)}
_HF_MODEL_MODULES = {hf: top for top, (hfs, _) in _MODEL_MODULES.items() for hf in hfs}
_HF_NAME = re.compile(
    r"(?:.*\.)?(?:model\.layers\.(?P<layer>\d+)\.(?P<sub>"
    + "|".join(map(re.escape, _HF_LAYER_MODULES))
    + r")|(?P<top>"
    + "|".join(map(re.escape, _HF_MODEL_MODULES))
    + r"))"
)


def _match_megatron(megatron_name: str) -> tuple[tuple[str, ...], str, str | None]:
    """(HF module names, split kind, layer index or None) of a megatron module name."""
    m = _MEGATRON_NAME.fullmatch(megatron_name)
    if m is None:
        raise KeyError(
            f"{megatron_name!r} is not a megatron GPT module this bridge maps; known: "
            f"decoder.layers.N.{{{', '.join(_LAYER_MODULES)}}}, {', '.join(_MODEL_MODULES)}."
        )
    if m["top"]:
        hf_names, kind = _MODEL_MODULES[m["top"]]
        return hf_names, kind, None
    hf_names, kind = _LAYER_MODULES[m["sub"]]
    return tuple(f"model.layers.{m['layer']}.{hf}" for hf in hf_names), kind, m["layer"]


def hf_module_names(megatron_name: str) -> list[str]:
    """The HF module name(s) that a megatron GPT module corresponds to, in fused order.

    ``decoder.layers.3.self_attention.linear_qkv`` -> ``model.layers.3.self_attn.{q,k,v}_proj``;
    ``mlp.linear_fc1`` -> ``mlp.gate_proj``, ``mlp.up_proj``; ``linear_proj`` -> ``o_proj``;
    ``linear_fc2`` -> ``down_proj``. Any prefix before the megatron name (``module.``, a PEFT
    wrapper's) is dropped. The layer index must be global: under pipeline parallelism pass
    :func:`dist_lora.naming.global_module_name` of the local name.
    """
    return list(_match_megatron(megatron_name)[0])


def megatron_module_name(hf_name: str) -> tuple[str, int]:
    """The megatron module an HF module belongs to and its position among
    :func:`hf_module_names` of it: ``model.layers.3.self_attn.k_proj`` ->
    (``decoder.layers.3.self_attention.linear_qkv``, 1). Any prefix before ``model.`` /
    ``lm_head`` (``base_model.model.``) is dropped."""
    m = _HF_NAME.fullmatch(hf_name)
    if m is None:
        raise KeyError(
            f"{hf_name!r} is not an HF Llama-family module this bridge maps; known: "
            f"model.layers.N.{{{', '.join(_HF_LAYER_MODULES)}}}, {', '.join(_HF_MODEL_MODULES)}."
        )
    if m["top"]:
        return _HF_MODEL_MODULES[m["top"]], 0
    sub, position = _HF_LAYER_MODULES[m["sub"]]
    return f"decoder.layers.{m['layer']}.{sub}", position


# ---------------------------------------------------------------------------------------------
# Building and loading


def build_megatron_gpt(
    hf_dir: str | os.PathLike[str],
    tp: int = 1,
    pp: int = 1,
    sequence_parallel: bool = False,
    **overrides: Any,
) -> "GPTModel":
    """This rank's megatron GPTModel (local spec, RoPE) with the HF checkpoint's weights.

    megatron's parallel state must be initialised with TP=tp, PP=pp (no virtual pipeline).
    The config and parallel layout are validated, and the checkpoint files located, before
    any process-group work. Embedding on the first PP stage, final norm and output layer on
    the last; each rank reads only its own slices of its own stage's tensors.
    ``overrides`` go to :func:`transformer_config_from_hf`.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from ..parallel.norm import gpt_local_block_spec

    hf_config = read_hf_config(hf_dir)
    config = transformer_config_from_hf(hf_config, tp, pp, sequence_parallel, **overrides)
    model_kwargs = gpt_model_kwargs_from_hf(hf_config)
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron's parallel state is not initialised (parallel_state.initialize_model_parallel).")
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if actual != (tp, pp):
        raise ValueError(
            f"build_megatron_gpt(tp={tp}, pp={pp}) but megatron is initialised with TP={actual[0]}, PP={actual[1]}."
        )
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
        raise UnsupportedCheckpointError("virtual pipeline stages are not supported by build_megatron_gpt.")
    with CheckpointReader(hf_dir) as reader:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        with _cpu_tensor_cuda_noop(enabled=pp > 1 and model_kwargs["share_embeddings_and_output_weights"]):
            model = GPTModel(
                config=config,
                transformer_layer_spec=gpt_local_block_spec(config, pp_rank=pp_rank),
                pre_process=parallel_state.is_pipeline_first_stage(),
                post_process=parallel_state.is_pipeline_last_stage(),
                **model_kwargs,
            )
        load_hf_weights(model, reader)
    return model


@contextlib.contextmanager
def _cpu_tensor_cuda_noop(enabled: bool) -> Iterator[None]:
    """With tied embeddings and PP > 1, GPTModel's constructor all-reduces the output-layer copy
    of the embedding after ``weight.data.cuda()``, which raises on a CPU-only torch. Make
    ``Tensor.cuda`` return the tensor for the duration (CPU only; the loaded weights overwrite
    whatever the all-reduce produced)."""
    if not enabled or torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def load_hf_weights(model: torch.nn.Module, checkpoint: CheckpointReader | str | os.PathLike[str]) -> int:
    """Copy this rank's slices of an HF checkpoint into a bare megatron GPTModel built for it
    (every parameter must be mapped; call before wrapping it with LoRA). Also sets megatron's
    tensor-parallel markers (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``),
    which megatron skips when ``perform_initialization=False``. Returns the bytes read."""
    from megatron.core import parallel_state

    if not isinstance(checkpoint, CheckpointReader):
        with CheckpointReader(checkpoint) as reader:
            return load_hf_weights(model, reader)
    reader = checkpoint
    start = reader.bytes_read
    config = model.config
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    for name, param in model.named_parameters():
        hf_names, kind, layer_name = _param_source(model, name)
        suffix = name.rsplit(".", 1)[1]
        if kind == "vocab" and tied:
            hf_names = ("model.embed_tokens",)
        sources = [f"{hf}.{suffix}" for hf in hf_names]
        if kind == "norm":
            tensor = reader.read(sources[0])
        elif kind == "vocab":
            tensor = reader.read(sources[0], contiguous_shard(reader.shape(sources[0])[0], rank, size))
        elif kind == "row":
            tensor = reader.read(sources[0], slice(None), contiguous_shard(reader.shape(sources[0])[1], rank, size))
        elif kind == "gate_up":
            rows = contiguous_shard(config.ffn_hidden_size, rank, size)
            tensor = merge_gate_up(reader.read(sources[0], rows), reader.read(sources[1], rows))
        elif kind == "qkv":
            heads, groups, head_dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
            ranges = qkv_shard_row_ranges(heads, groups, head_dim, rank, size)
            q, k, v = (reader.read(src, rows) for src, rows in zip(sources, ranges))
            tensor = merge_qkv_rows(q, k, v, heads // size, groups // size, head_dim)
        else:  # pragma: no cover - the tables above hold only these kinds
            raise AssertionError(kind)
        if tensor.shape != param.shape:
            raise ValueError(
                f"{name} ({layer_name or 'model'}): checkpoint gives shape {tuple(tensor.shape)} from {sources}, "
                f"the model has {tuple(param.shape)} (config.json does not match the weights?)."
            )
        with torch.no_grad():
            param.copy_(tensor)
        if kind in _TP_ATTRIBUTES and not hasattr(param, "tensor_model_parallel"):
            from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

            dim, stride = _TP_ATTRIBUTES[kind]
            set_tensor_model_parallel_attributes(param, True, dim, stride)
    return reader.bytes_read - start


def _param_source(model: torch.nn.Module, param_name: str) -> tuple[tuple[str, ...], str, str | None]:
    """(HF module names, split kind, global megatron module name) of a local parameter name."""
    module_name = param_name.rsplit(".", 1)[0]
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", module_name)
    if m is not None:  # local index on this PP stage -> global
        layer_number = model.decoder.layers[int(m[1])].layer_number
        module_name = f"decoder.layers.{layer_number - 1}.{m[2]}"
    try:
        hf_names, kind, _ = _match_megatron(module_name)
    except KeyError as err:
        raise KeyError(
            f"parameter {param_name!r} has no HF source (load_hf_weights takes a bare GPTModel built by "
            f"this bridge): {err}"
        ) from None
    return hf_names, kind, module_name
