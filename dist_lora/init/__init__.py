"""LoRA initialisations that read the base weight: PiSSA, OLoRA (weight_driven), CorDA (corda),
LoftQ (loftq); and EVA (eva), which reads the layers' inputs."""

from ..checkpoint.conversion import converted_config
from .corda import check_corda_ready, preprocess_corda
from .corda_math import CordaEigens
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .loftq import check_loftq_ready, loftq_factors, replace_lora_weights_loftq
from .weight_driven import is_weight_driven, sharded_weight_driven_factors, weight_driven_factors


def check_data_driven_init(model, targets: list[str], config) -> None:
    """Refuse a CorDA / LoftQ adapter before any base weight is rewritten (no-op for others)."""
    if config.init_lora_weights == "corda":
        check_corda_ready(model, targets, config)
    elif config.init_lora_weights == "loftq":
        check_loftq_ready(model, targets, config)


__all__ = [
    "CordaEigens",
    "check_data_driven_init",
    "converted_config",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "is_weight_driven",
    "loftq_factors",
    "preprocess_corda",
    "replace_lora_weights_loftq",
    "sharded_weight_driven_factors",
    "weight_driven_factors",
]
