"""``deepspeed.initialize`` for a LoRA model, with the config checked first.

Order matters under ZeRO-3: build the base model (ideally under ``deepspeed.zero.Init``),
inject the adapters (``get_lora_model``), then call :func:`initialize`. DeepSpeed registers
its fetch/release hooks on the modules that exist at that moment and partitions the new
adapter parameters like every other parameter; adapters injected afterwards would be invisible
to it.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..layers.embedding import LoraEmbedding
from ..layers.parameter import LoraParameter
from .config import check_ds_config, load_ds_config
from .setup import prepare_deepspeed


def initialize(
    model: torch.nn.Module,
    config: dict[str, Any] | str | os.PathLike,
    allow_jit: Optional[bool] = None,
    **kwargs: Any,
) -> tuple:
    """``deepspeed.initialize(model=model, model_parameters=<trainable>, config=config, **kwargs)``
    after :func:`~dist_lora.deepspeed.setup.prepare_deepspeed` and
    :func:`~dist_lora.deepspeed.config.check_ds_config`. Only trainable parameters (the
    adapters, biases or modules_to_save they enable) go to the optimizer. Returns DeepSpeed's
    ``(engine, optimizer, dataloader, lr_scheduler)``."""
    prepare_deepspeed()
    config = load_ds_config(config) if isinstance(config, (str, os.PathLike)) else dict(config)
    check_ds_config(config, allow_jit=allow_jit)
    import deepspeed

    _refuse_embedding_adapters(model)
    _refuse_parameter_adapters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: inject adapters (get_lora_model) before initialize.")
    return deepspeed.initialize(model=model, model_parameters=params, config=config, **kwargs)


def _refuse_embedding_adapters(model: torch.nn.Module) -> None:
    """A DeepSpeed checkpoint names parameters only, and an embedding's factors would look like
    a linear layer's there (PEFT would then ignore them): refuse until the checkpoint records
    module kinds. ``model.save_pretrained`` under ZeRO-1/2 and the megatron path have no such limit."""
    names = [name for name, module in model.named_modules() if isinstance(module, LoraEmbedding)]
    if names:
        raise ValueError(
            f"LoRA on embeddings ({', '.join(names[:3])}) is not supported under DeepSpeed yet: its checkpoints "
            "could not be consolidated into a PEFT adapter. Leave embeddings out of target_modules."
        )


def _refuse_parameter_adapters(model: torch.nn.Module) -> None:
    """target_parameters adapters swap a whole (expert) parameter into their module's forward,
    which ZeRO-3's per-module gathering does not know, and DeepSpeed checkpoints do not record
    the stacked expert layout: refused under DeepSpeed until both are handled."""
    names = [name for name, module in model.named_modules() if isinstance(module, LoraParameter)]
    if names:
        raise ValueError(
            f"LoRA on parameters (target_parameters: {', '.join(names[:3])}) is not supported under DeepSpeed yet; "
            "train it without DeepSpeed, or on the megatron path (expert LoRA on linear_fc1 / linear_fc2)."
        )
