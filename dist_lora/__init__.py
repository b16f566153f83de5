"""dist_lora: PEFT-compatible LoRA for megatron-core tensor/sequence-parallel models."""

from .quiet import filter_third_party_notices

filter_third_party_notices()  # before anything imports megatron-core or PEFT

from .config import ConfigError, CordaConfig, DistLoraWarning, EvaConfig, LoftQConfig, LoraConfig, LoraRuntimeConfig  # noqa: E402
from .model import LoraModel, get_lora_model
from .peft_api import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from .peft_status import get_layer_status, get_model_status
from .init import preprocess_corda, replace_lora_weights_loftq
from .init.eva import get_eva_state_dict, initialize_lora_eva_weights

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DistLoraWarning",
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "get_eva_state_dict",
    "get_layer_status",
    "get_lora_model",
    "get_model_status",
    "get_peft_model_state_dict",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "preprocess_corda",
    "replace_lora_weights_loftq",
    "set_peft_model_state_dict",
]
