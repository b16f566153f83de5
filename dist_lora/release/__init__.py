"""Releasing a trained adapter: one PEFT file, a merged HF model, or a PEFT file back into megatron.

Public entry points:

* :func:`.consolidate.consolidate` / :func:`.consolidate.consolidate_deepspeed`: a sharded or
  a DeepSpeed checkpoint -> one PEFT adapter (``dist-lora consolidate``);
* :func:`.merged.merge_export`: a sharded checkpoint merged into its HF base model
  (``dist-lora merge``);
* :func:`.to_megatron.load_peft_adapter_into_megatron` (and :func:`.translate.translate_peft_adapter`):
  a PEFT adapter -> a tensor/pipeline-parallel megatron model.

The consolidation stages, each a public function used by both sources:

* :mod:`.sources`: a checkpoint read as :class:`~.sources.Source` tensors (sharded checkpoint;
  :mod:`.deepspeed_source` for DeepSpeed);
* :mod:`.checks`: the adapter against its config and the HF config;
* :mod:`.peft`: output names and adapter_config.json (megatron -> HF names via the bridges);
* :mod:`.hf_model`: every output key against the HF model built on the meta device;
* :mod:`.write`: streamed, staged safetensors output; :mod:`.errors`: the error type.

Reading the shard format stays in :mod:`dist_lora.checkpoint` (this package is above it).
"""
