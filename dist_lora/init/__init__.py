"""Weight-driven LoRA initialisations (PiSSA, OLoRA)."""

from .weight_driven import converted_config, is_weight_driven, sharded_weight_driven_factors, weight_driven_factors

__all__ = ["converted_config", "is_weight_driven", "sharded_weight_driven_factors", "weight_driven_factors"]
