"""DeepSpeed integration: ZeRO-aware LoRA (see :mod:`.setup` for running DeepSpeed on CPU,
:mod:`.zero` for what changes under ZeRO-3, :mod:`.data_driven` for EVA/CorDA on a ZeRO-3 model,
:mod:`.config` for config checks)."""

from .config import check_ds_config, load_ds_config
from .data_driven import check_forward_ready, gathered_forward
from .engine import initialize
from .setup import prepare_deepspeed

__all__ = ["check_ds_config", "check_forward_ready", "gathered_forward", "initialize", "load_ds_config", "prepare_deepspeed"]
