"""DeepSpeed integration, the face users call: :mod:`.engine` (``initialize``), :mod:`.setup`
for running DeepSpeed on CPU, :mod:`.data_driven` for EVA/CorDA on a ZeRO-3 model, :mod:`.config`
for config checks, :mod:`.megatron` for megatron TP under ZeRO. The ZeRO-3 primitives the layers
and checkpoints use (full shapes, gathering, who may write) are below, in :mod:`dist_lora.parallel.zero`."""

from .config import check_ds_config, load_ds_config
from .data_driven import check_forward_ready, gathered_forward
from .engine import initialize
from .setup import prepare_deepspeed

__all__ = ["check_ds_config", "check_forward_ready", "gathered_forward", "initialize", "load_ds_config", "prepare_deepspeed"]
