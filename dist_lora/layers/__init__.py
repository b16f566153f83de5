"""LoRA layers: the adapter math (``math``), the adapter-holding base class, and one small
class per kind of base layer."""

from .base import LoraLayer
from .embedding import LoraEmbedding
from .kinds import is_conv1d
from .linear import LoraLinear
from .parameter import LoraParameter

__all__ = ["LoraEmbedding", "LoraLayer", "LoraLinear", "LoraParameter", "is_conv1d"]
