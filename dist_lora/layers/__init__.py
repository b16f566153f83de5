"""LoRA layers: the adapter math (``math``), the adapter-holding base class, and one small
class per kind of base layer."""

from .base import LoraLayer
from .embedding import LoraEmbedding
from .linear import LoraLinear, is_conv1d

__all__ = ["LoraEmbedding", "LoraLayer", "LoraLinear", "is_conv1d"]
