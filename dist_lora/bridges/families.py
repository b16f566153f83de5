"""The model-family tables: Llama, Mistral, Qwen2, Qwen3, Mixtral and Qwen3-MoE (the form is in :mod:`.table`).

All are pre-norm Llama decoders (RMSNorm, SwiGLU, grouped-query attention,
rotate-half RoPE), so they share one config-field mapping and the Llama module table; they
differ in their config rules (Qwen2's q/k/v biases, Mistral's and the Qwens' sliding-window
switches) and Qwen3 adds an RMSNorm over the head dimension of every query and key head
after the projection, before RoPE (megatron's ``qk_layernorm``), one [head_dim] weight each
for q and k, shared by all heads. Mixtral and Qwen3-MoE (Qwen3's attention) replace the MLP
by a mixture of experts (router + SwiGLU experts, below). Adding a family means adding one :class:`~.table.ModelFamily` here
(and its module table where the decoder differs).

Weight mapping (HF ``model.layers.N.`` <-> megatron ``decoder.layers.N.``, global N), with
what TP rank i of t holds:

=========================================  ==================================  ===================
HF                                         megatron                            TP rank i holds
=========================================  ==================================  ===================
model.embed_tokens                         embedding.word_embeddings           vocab rows i (dim 0)
self_attn.{q,k,v}_proj (+ bias, qwen2)     self_attention.linear_qkv           whole query groups i
self_attn.{q,k}_norm (qwen3)               self_attention.{q,k}_layernorm      all [head_dim]
self_attn.o_proj                           self_attention.linear_proj          columns i (dim 1)
input_layernorm                            input_layernorm                     all
post_attention_layernorm                   pre_mlp_layernorm                   all
mlp.{gate,up}_proj                         mlp.linear_fc1 = [gate_i; up_i]     rows i of each
mlp.down_proj                              mlp.linear_fc2                      columns i (dim 1)
model.norm                                 decoder.final_layernorm             all
lm_head (embed_tokens when tied)           output_layer                        vocab rows i (dim 0)
=========================================  ==================================  ===================

Mixture-of-experts layers (Mixtral; Qwen3-MoE the same with the HF names in brackets),
e = GLOBAL expert index; expert-parallel rank r of ep
holds experts r·E/ep .. (r+1)·E/ep - 1 as its local experts J = e - r·E/ep, and splits each
over the expert-tensor-parallel (ETP) group; the router is whole on every rank:

===============================================  ==========================================  ===============
HF (per-expert files / transformers 5 3-D)       megatron                                    ETP rank i holds
===============================================  ==========================================  ===============
block_sparse_moe.gate / mlp.gate [mlp.gate]      mlp.router                                  all
block_sparse_moe.experts.e.{w1,w3} /             mlp.experts.local_experts.J.linear_fc1      rows i of each
  mlp.experts.gate_up_proj[e] = [w1; w3]           = [w1_i; w3_i]
  [mlp.experts.e.{gate,up}_proj / same 3-D]
block_sparse_moe.experts.e.w2 /                  mlp.experts.local_experts.J.linear_fc2      columns i
  mlp.experts.down_proj[e]
  [mlp.experts.e.down_proj / same 3-D]
===============================================  ==========================================  ===============
"""

from __future__ import annotations

import torch.nn.functional as F

from .table import EXPERT, MEGATRON_LAYERS, ModelFamily, MoEKeys, Module, ModuleTable

LLAMA_MODULES = ModuleTable(
    layer=(
        Module("input_layernorm", ("input_layernorm",)),
        Module(
            "self_attention.linear_qkv",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            tp="column",
            fused="qkv",
            features=(("hidden", "q"), ("hidden", "kv"), ("hidden", "kv")),
        ),
        Module("self_attention.linear_proj", ("self_attn.o_proj",), tp="row", features=(("q", "hidden"),)),
        Module("pre_mlp_layernorm", ("post_attention_layernorm",)),
        Module(
            "mlp.linear_fc1",
            ("mlp.gate_proj", "mlp.up_proj"),
            tp="column",
            fused="gate_up",
            features=(("hidden", "ffn"), ("hidden", "ffn")),
        ),
        Module("mlp.linear_fc2", ("mlp.down_proj",), tp="row", features=(("ffn", "hidden"),)),
    ),
    model=(
        Module("embedding.word_embeddings", ("model.embed_tokens",), tp="vocab", features=(("vocab", "hidden"),)),
        Module("decoder.final_layernorm", ("model.norm",)),
        Module(
            "output_layer", ("lm_head",), tp="vocab", features=(("hidden", "vocab"),), tied=("model.embed_tokens",)
        ),
    ),
)

# Qwen3: the Llama table plus the per-head q/k RMSNorms (replicated: each TP rank applies
# them to its own heads).
QWEN3_MODULES = ModuleTable(
    layer=LLAMA_MODULES.layer
    + (
        Module("self_attention.q_layernorm", ("self_attn.q_norm",)),
        Module("self_attention.k_layernorm", ("self_attn.k_norm",)),
    ),
    model=LLAMA_MODULES.model,
)

# (HFLlamaArch field, HF config.json key, megatron TransformerConfig field) of the geometry.
LLAMA_CONFIG_FIELDS = (
    ("num_layers", "num_hidden_layers", "num_layers"),
    ("hidden_size", "hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_key_value_heads", "num_query_groups"),
    ("head_dim", "head_dim", "kv_channels"),
)

# TransformerConfig fields every Llama-family model has.
LLAMA_MEGATRON_CONFIG = dict(
    normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False
)

# The named dimensions of the module features: size from the parsed config, and the config
# field(s) it comes from.
LLAMA_DIMENSIONS = {
    "hidden": (lambda arch: arch.hidden_size, "hidden_size"),
    "q": (lambda arch: arch.num_attention_heads * arch.head_dim, "attention heads"),
    "kv": (lambda arch: arch.num_query_groups * arch.head_dim, "attention heads"),
    "ffn": (lambda arch: arch.ffn_hidden_size, "intermediate_size"),
    "vocab": (lambda arch: arch.vocab_size, "vocab_size"),
}

_LLAMA_DECODER = dict(
    modules=LLAMA_MODULES,
    config_fields=LLAMA_CONFIG_FIELDS,
    megatron_config=LLAMA_MEGATRON_CONFIG,
    dimensions=LLAMA_DIMENSIONS,
)

LLAMA = ModelFamily("llama", "LlamaForCausalLM", **_LLAMA_DECODER)
MISTRAL = ModelFamily("mistral", "MistralForCausalLM", sliding_window_size="sliding_window", **_LLAMA_DECODER)
QWEN2 = ModelFamily(
    "qwen2", "Qwen2ForCausalLM", qkv_bias=True, sliding_window_flag="use_sliding_window", **_LLAMA_DECODER
)
QWEN3 = ModelFamily(
    "qwen3",
    "Qwen3ForCausalLM",
    sliding_window_flag="use_sliding_window",
    config_defaults={"head_dim": 128},  # transformers' Qwen3Config default, not hidden / heads
    **{**_LLAMA_DECODER, "modules": QWEN3_MODULES, "megatron_config": {**LLAMA_MEGATRON_CONFIG, "qk_layernorm": True}},
)

# Mixture of experts: the router (a replicated [E, H] linear) and E SwiGLU experts per layer.
def moe_entries(router: str, experts: str, gate: str, up: str, down: str, router_v5: str = "") -> tuple[Module, ...]:
    """The router and expert entries of a MoE layer whose HF router is ``router`` and whose
    expert ``E`` holds ``<experts>.E.<gate|up|down>`` (per-expert layout); transformers 5 fuses
    the experts into ``mlp.experts.gate_up_proj`` / ``down_proj`` (``v5``)."""
    expert = f"{experts}.{EXPERT}"
    return (
        Module("mlp.router", (router,), features=(("hidden", "experts"),), v5=router_v5),
        Module(
            f"mlp.experts.local_experts.{EXPERT}.linear_fc1",
            (f"{expert}.{gate}", f"{expert}.{up}"),
            tp="column",
            fused="gate_up",
            features=(("hidden", "moe_ffn"), ("hidden", "moe_ffn")),
            v5="mlp.experts.gate_up_proj",
        ),
        Module(
            f"mlp.experts.local_experts.{EXPERT}.linear_fc2",
            (f"{expert}.{down}",),
            tp="row",
            features=(("moe_ffn", "hidden"),),
            v5="mlp.experts.down_proj",
        ),
    )


MIXTRAL_MOE = moe_entries("block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w3", "w2", router_v5="mlp.gate")
MIXTRAL_MODULES = ModuleTable(
    layer=tuple(entry for entry in LLAMA_MODULES.layer if not entry.megatron.startswith("mlp.")) + MIXTRAL_MOE,
    model=LLAMA_MODULES.model,
)

MIXTRAL = ModelFamily(
    "mixtral",
    "MixtralForCausalLM",
    modules=MIXTRAL_MODULES,
    config_fields=LLAMA_CONFIG_FIELDS,
    megatron_config=LLAMA_MEGATRON_CONFIG,
    dimensions={
        **LLAMA_DIMENSIONS,
        "moe_ffn": (lambda arch: arch.moe_ffn_hidden_size, "intermediate_size"),
        "experts": (lambda arch: arch.num_experts, "num_local_experts"),
    },
    sliding_window_size="sliding_window",
    moe=MoEKeys(num_experts=("num_local_experts", "num_experts"), ffn="intermediate_size"),
)

# Qwen3-MoE: Qwen3's attention (q/k norms), the router ``mlp.gate`` and experts under
# ``mlp.experts``; the dense MLP entries stay for the layers ``mlp_only_layers`` /
# ``decoder_sparse_step`` leave dense (megatron's ``moe_layer_freq``).
QWEN3_MOE_MOE = moe_entries("mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj")
QWEN3_MOE_MODULES = ModuleTable(layer=QWEN3_MODULES.layer + QWEN3_MOE_MOE, model=QWEN3_MODULES.model)

QWEN3_MOE = ModelFamily(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    modules=QWEN3_MOE_MODULES,
    config_fields=LLAMA_CONFIG_FIELDS,
    megatron_config={**LLAMA_MEGATRON_CONFIG, "qk_layernorm": True},
    dimensions={
        **LLAMA_DIMENSIONS,
        "moe_ffn": (lambda arch: arch.moe_ffn_hidden_size, "moe_intermediate_size"),
        "experts": (lambda arch: arch.num_experts, "num_experts"),
    },
    sliding_window_flag="use_sliding_window",
    moe=MoEKeys(
        num_experts=("num_experts", "num_local_experts"),
        ffn="moe_intermediate_size",
        norm_topk_prob="norm_topk_prob",
        sparse_step="decoder_sparse_step",
        dense_layers="mlp_only_layers",
    ),
)

FAMILIES: dict[str, ModelFamily] = {
    family.model_type: family for family in (LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN3_MOE)
}
# The table used where no HF config says which family: every dense family's modules (the
# Llama table is a part of Qwen3's, and no name means two things; MoE tables are looked up by family).
DEFAULT_MODULES = QWEN3_MODULES


def family_of(model_type: str) -> ModelFamily:
    """The family serving an HF ``model_type``; KeyError if none does."""
    return FAMILIES[model_type]


def hf_module_names(megatron_name: str) -> list[str]:
    """The HF module name(s) that a megatron GPT module corresponds to, in fused order.

    ``decoder.layers.3.self_attention.linear_qkv`` -> ``model.layers.3.self_attn.{q,k,v}_proj``;
    ``mlp.linear_fc1`` -> ``mlp.gate_proj``, ``mlp.up_proj``; ``linear_proj`` -> ``o_proj``;
    ``linear_fc2`` -> ``down_proj``. Any prefix before the megatron name (``module.``, a PEFT
    wrapper's) is dropped. The layer index must be global: under pipeline parallelism pass
    :func:`dist_lora.naming.global_module_name` of the local name.
    """
    return list(DEFAULT_MODULES.megatron(megatron_name).hf)


def megatron_module_name(hf_name: str) -> tuple[str, int]:
    """The megatron module an HF module belongs to and its position among
    :func:`hf_module_names` of it: ``model.layers.3.self_attn.k_proj`` ->
    (``decoder.layers.3.self_attention.linear_qkv``, 1). Any prefix before ``model.`` /
    ``lm_head`` (``base_model.model.``) is dropped."""
    mapped, position = DEFAULT_MODULES.hf(hf_name)
    return mapped.megatron, position


def is_megatron_name(module: str) -> bool:
    """Global megatron GPTModel names start at the GPTModel (``decoder.layers.N.``, ``embedding.``,
    ``output_layer``); HF names start with ``model.`` / ``lm_head`` / ``transformer.`` ..."""
    return module.startswith((MEGATRON_LAYERS + ".", "embedding.")) or module in (
        "output_layer",
        "decoder.final_layernorm",
    )
