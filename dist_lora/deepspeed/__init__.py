"""DeepSpeed integration: ZeRO-aware LoRA (see :mod:`.setup` for running DeepSpeed on CPU)."""

from .setup import prepare_deepspeed

__all__ = ["prepare_deepspeed"]
