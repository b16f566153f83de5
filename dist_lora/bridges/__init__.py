"""Hugging Face <-> megatron-core bridges: one declarative table per model family.

* :mod:`.table`: the form of a family table (:class:`ModelFamily`, :class:`ModuleTable`,
  :class:`Module`) and the name / geometry look-ups derived from it;
* :mod:`.families`: the Llama, Mistral, Qwen2, Qwen3, Mixtral and Qwen3-MoE tables;
* :mod:`.layouts`: the fused QKV and gate/up row layouts (one implementation each);
* :mod:`.hf_config`: an HF ``config.json`` -> checked facts -> megatron's TransformerConfig;
* :mod:`.moe_config`: the mixture-of-experts part of that (router settings, EP layout, refusals);
* :mod:`.errors`: :class:`UnsupportedCheckpointError`;
* :mod:`.gpt`: a megatron GPTModel built from an HF checkpoint (base weights HF -> megatron);
* :mod:`.adapters`: LoRA adapters between fused megatron modules and HF modules;
* :mod:`.checkpoint_reader`: the one reader of HF safetensors checkpoints (sliced, lazy);
* :mod:`.block_spec`: megatron's local GPT block spec with sequence-parallel torch norms and
  per-head q/k norms (imports megatron, so it is not imported here).
"""

from .adapters import incomplete_adapter, rows_to_hf
from .checkpoint_reader import CheckpointReader
from .families import (
    DEFAULT_MODULES,
    FAMILIES,
    LLAMA,
    MISTRAL,
    MIXTRAL,
    QWEN2,
    QWEN3,
    QWEN3_MOE,
    family_of,
    hf_module_names,
    is_megatron_name,
    megatron_module_name,
)
from .gpt import build_megatron_gpt, load_hf_weights
from .hf_config import (
    SUPPORTED_ARCHITECTURES,
    HFLlamaArch,
    UnsupportedCheckpointError,
    check_parallel_layout,
    gpt_model_kwargs_from_hf,
    megatron_geometry_mismatch,
    moe_config_fields,
    parse_hf_config,
    read_hf_config,
    transformer_config_from_hf,
)
from .layouts import (
    Attention,
    contiguous_shard,
    fused_shard_ranges,
    merge_fused,
    merge_gate_up,
    merge_qkv_rows,
    qkv_shard_row_ranges,
    split_fused,
    split_gate_up,
    split_qkv_rows,
)
from .table import (
    EXPERT,
    HF_LAYERS,
    MEGATRON_LAYERS,
    Mapped,
    ModelFamily,
    MoEKeys,
    Module,
    ModuleTable,
    hf_features,
    layer_module_name,
    megatron_features,
    split_layer_name,
)

__all__ = [
    "Attention",
    "CheckpointReader",
    "DEFAULT_MODULES",
    "EXPERT",
    "FAMILIES",
    "HFLlamaArch",
    "HF_LAYERS",
    "LLAMA",
    "MEGATRON_LAYERS",
    "MISTRAL",
    "MIXTRAL",
    "Mapped",
    "ModelFamily",
    "MoEKeys",
    "Module",
    "ModuleTable",
    "QWEN2",
    "QWEN3",
    "QWEN3_MOE",
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedCheckpointError",
    "build_megatron_gpt",
    "check_parallel_layout",
    "contiguous_shard",
    "family_of",
    "fused_shard_ranges",
    "gpt_model_kwargs_from_hf",
    "hf_features",
    "hf_module_names",
    "incomplete_adapter",
    "is_megatron_name",
    "layer_module_name",
    "load_hf_weights",
    "megatron_features",
    "megatron_geometry_mismatch",
    "megatron_module_name",
    "moe_config_fields",
    "merge_fused",
    "merge_gate_up",
    "merge_qkv_rows",
    "parse_hf_config",
    "qkv_shard_row_ranges",
    "read_hf_config",
    "rows_to_hf",
    "split_fused",
    "split_gate_up",
    "split_layer_name",
    "split_qkv_rows",
    "transformer_config_from_hf",
]
