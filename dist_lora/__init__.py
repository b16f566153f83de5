"""dist_lora: PEFT-compatible LoRA for megatron-core tensor/sequence-parallel models."""

from .config import ConfigError, CordaConfig, EvaConfig, LoftQConfig, LoraConfig, LoraRuntimeConfig
from .model import LoraModel, get_lora_model

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "get_lora_model",
]
