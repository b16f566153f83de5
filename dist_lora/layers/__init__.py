"""LoRA layers: the adapter math (``math``), the adapter-holding base class, and one small
class per kind of base layer."""

from .base import LoraLayer
from .linear import LoraLinear, is_conv1d

__all__ = ["LoraLayer", "LoraLinear", "is_conv1d"]
