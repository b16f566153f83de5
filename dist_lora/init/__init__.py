"""Weight-driven LoRA initialisations (PiSSA, OLoRA)."""

from ..checkpoint.conversion import converted_config
from .weight_driven import is_weight_driven, sharded_weight_driven_factors, weight_driven_factors

__all__ = ["converted_config", "is_weight_driven", "sharded_weight_driven_factors", "weight_driven_factors"]
