"""Hugging Face <-> megatron-core bridges: names, fused layouts and sliced weight loading.

Llama family (Llama, Mistral, Qwen2): :mod:`dist_lora.bridges.hf_llama`. Layout transforms
shared by loading and adapter consolidation: :mod:`dist_lora.bridges.layouts`.
"""

from .checkpoint_reader import CheckpointReader
from .hf_llama import (
    SUPPORTED_ARCHITECTURES,
    HFLlamaArch,
    UnsupportedCheckpointError,
    build_megatron_gpt,
    check_parallel_layout,
    gpt_model_kwargs_from_hf,
    hf_module_names,
    load_hf_weights,
    megatron_module_name,
    parse_hf_config,
    read_hf_config,
    transformer_config_from_hf,
)
from .layouts import (
    contiguous_shard,
    merge_gate_up,
    merge_qkv_rows,
    qkv_shard_row_ranges,
    split_gate_up,
    split_qkv_rows,
)

__all__ = [
    "CheckpointReader",
    "HFLlamaArch",
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedCheckpointError",
    "build_megatron_gpt",
    "check_parallel_layout",
    "contiguous_shard",
    "gpt_model_kwargs_from_hf",
    "hf_module_names",
    "load_hf_weights",
    "megatron_module_name",
    "merge_gate_up",
    "merge_qkv_rows",
    "parse_hf_config",
    "qkv_shard_row_ranges",
    "read_hf_config",
    "split_gate_up",
    "split_qkv_rows",
    "transformer_config_from_hf",
]
