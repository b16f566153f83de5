"""DeepSpeed integration, the face users call: :mod:`.engine` (``initialize``), :mod:`.setup`
for running DeepSpeed on CPU, :mod:`.config` for config checks, :mod:`.megatron` for megatron TP
under ZeRO, and ``gathered_forward`` for EVA/CorDA's data pass on a ZeRO-3 model. The ZeRO-3
primitives the layers, inits and checkpoints use (full shapes, gathering, who may write, the
gathered data pass) live below, in :mod:`dist_lora.parallel.zero` and :mod:`dist_lora.parallel.zero_forward`."""

from .config import check_ds_config, load_ds_config
from ..parallel.zero_forward import check_forward_ready, gathered_forward
from .engine import initialize
from .setup import prepare_deepspeed

__all__ = ["check_ds_config", "check_forward_ready", "gathered_forward", "initialize", "load_ds_config", "prepare_deepspeed"]
