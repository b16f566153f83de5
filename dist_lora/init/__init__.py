"""Model-level init drivers, above :mod:`dist_lora.model`: EVA (``eva``: the layers' inputs
after injection), CorDA's data pass (``corda``: covariances before injection) and LoftQ on
a model already quantised with bitsandbytes (``loftq``). The factor math they and the LoRA
layers share is in :mod:`dist_lora.factors`; the init kinds in :class:`dist_lora.config.InitKind`."""

from .corda import preprocess_corda
from .eva import get_eva_state_dict, initialize_lora_eva_weights
from .loftq import replace_lora_weights_loftq

__all__ = [
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_corda",
    "replace_lora_weights_loftq",
]
