"""DeepSpeed integration: ZeRO-aware LoRA (see :mod:`.setup` for running DeepSpeed on CPU,
:mod:`.zero` for what changes under ZeRO-3, :mod:`.config` for config checks)."""

from .config import check_ds_config, load_ds_config
from .engine import initialize
from .setup import prepare_deepspeed

__all__ = ["check_ds_config", "initialize", "load_ds_config", "prepare_deepspeed"]
