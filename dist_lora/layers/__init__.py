"""LoRA layers: the adapter math (``math``), the adapter-holding base class, and one small
class per kind of base layer."""

from .base import LoraLayer
from .embedding import LoraEmbedding
from .kinds import is_conv1d
from .linear import LoraLinear

__all__ = ["LoraEmbedding", "LoraLayer", "LoraLinear", "is_conv1d"]
