"""Hugging Face LoRA models under PyTorch FSDP2: :mod:`.shard` (``shard_lora_model``) and
:mod:`.checkpoint` (DCP checkpoints of adapters and optimizer state)."""

from .shard import bf16_policy, decoder_layers, is_fsdp2, shard_lora_model, trainable_parameters

__all__ = ["bf16_policy", "decoder_layers", "is_fsdp2", "shard_lora_model", "trainable_parameters"]
