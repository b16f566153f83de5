"""Hugging Face LoRA models under PyTorch FSDP2: :mod:`.shard` (``shard_lora_model``) and
:mod:`.checkpoint` (DCP checkpoints of adapters and optimizer state), :mod:`.meta`
(``load_sharded_lora_model``: built on the meta device, each rank loading only its rows)."""

from .shard import bf16_policy, decoder_layers, is_fsdp2, shard_lora_model, trainable_parameters

__all__ = ["bf16_policy", "decoder_layers", "is_fsdp2", "shard_lora_model", "trainable_parameters"]
