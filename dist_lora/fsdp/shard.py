"""Shard a Hugging Face LoRA model with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

    lora = get_lora_model(hf_model, LoraConfig(r=16, target_modules="all-linear"))
    lora = shard_lora_model(lora)                    # every rank, after adding every adapter
    optimizer = torch.optim.AdamW(trainable_parameters(lora), lr=1e-4)
    loss = lora(input_ids=ids, labels=ids).loss; loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable_parameters(lora), 1.0)  # global norm (DTensor)
    optimizer.step(); optimizer.zero_grad()

Groups: one ``fully_shard`` per decoder layer (the classes transformers lists in the model's
``_no_split_modules``), then one at the root (embeddings, final norm, head). Every parameter,
frozen base and trainable adapter alike, is split along dim 0 over the mesh; each rank keeps
1/N of the model between layers and all-gathers one layer at a time. A layer's frozen weights
and its adapters share its group: FSDP2 all-gathers both in one collective and reduce-scatters
only the parameters that have a gradient (the adapters), so only they carry gradients and,
since the optimizer gets only them, optimizer state.

Gradients: each rank's loss is the mean over its own tokens, FSDP2 reduce-scatters the mean of
the ranks' gradients (``reduce_dtype``), so with equal tokens per rank the step equals one
process over the whole batch. ``clip_grad_norm_`` on DTensor gradients computes the global
norm (sum of the squared local shard norms over the mesh, then the root): the same clip as one
process.

Mixed precision (``mp_policy``, default :func:`bf16_policy` when ``dtype`` says so): the sharded
masters stay in their own dtype (adapters fp32: ``autocast_adapter_dtype``), the unsharded
copies the forward sees are cast to ``param_dtype``, gradients are reduced in ``reduce_dtype``
(fp32) into fp32 sharded gradients, and the optimizer updates fp32 masters.

Refused (before anything changes): a model that is not a :class:`~dist_lora.model.LoraModel`,
one already wrapped by DeepSpeed (engine or ZeRO-3 parameters), by FSDP1 or by FSDP2, a
tensor-parallel megatron model, a model without recognisable decoder layers. After sharding
the model's adapter set is locked (:meth:`~dist_lora.model.LoraModel.lock_structure`): adding,
loading, deleting or merging adapters is refused (FSDP2 knows only the parameters it sharded).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from ..model import LoraModel

LOCK_REASON = (
    "the model is sharded with FSDP2 (dist_lora.fsdp.shard_lora_model), which knows only the parameters present "
    "when it sharded; add or load every adapter before shard_lora_model, and merge offline (dist-lora merge) or "
    "on an unsharded model"
)


def bf16_policy():
    """bf16 compute (parameters all-gathered in bf16), fp32 gradient reduction; masters keep their dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to give the optimizer (and the gradient clip): those with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was sharded by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model: modules whose class is in its
    ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), outermost first."""
    classes = set()
    for module in model.modules():
        classes.update(getattr(module, "_no_split_modules", None) or [])
    found, inside = [], set()
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(p + ".") for p in inside):
            found.append(module)
            inside.add(name)
    return found


def check_shardable(model: nn.Module) -> None:
    """Raise if ``model`` cannot be sharded by :func:`shard_lora_model` (see the module docstring)."""
    engine = sys.modules.get("deepspeed")
    if engine is not None and isinstance(model, getattr(engine, "DeepSpeedEngine", ())):
        raise TypeError("the model is a DeepSpeed engine; FSDP2 and DeepSpeed cannot both own it. Pass the "
                        "LoraModel from get_lora_model, not wrapped by deepspeed.initialize.")
    if not isinstance(model, LoraModel):
        raise TypeError(f"shard_lora_model needs the LoraModel returned by get_lora_model, got {type(model).__name__}.")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise TypeError("the model has DeepSpeed ZeRO-3 parameters (built under deepspeed.zero.Init); load it "
                        "without DeepSpeed to shard it with FSDP2.")
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError("the model contains FSDP1 (FullyShardedDataParallel) modules; pass the unwrapped "
                        "LoraModel: shard_lora_model applies FSDP2 itself.")
    if is_fsdp2(model):
        raise ValueError("the model is already sharded with FSDP2 (fully_shard); shard it once.")
    tp = [name for name, layer in model.lora_layers() if getattr(layer, "tp_size", 1) > 1]
    if tp:
        raise ValueError(f"{tp[0]} is tensor parallel (megatron); FSDP2 here shards Hugging Face models only.")
    if not model.peft_config:
        raise ValueError("the model has no adapter; add every adapter before sharding.")
    if not decoder_layers(model.model):
        raise ValueError(f"found no decoder layers in {type(model.model).__name__} (no class of its "
                         "_no_split_modules); shard_lora_model supports transformers causal LMs.")


def shard_lora_model(
    model: LoraModel,
    mesh=None,
    mp_policy=None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> LoraModel:
    """Shard ``model`` in place with FSDP2 (per decoder layer, then the root) and return it.

    Every rank calls this with the same model (same weights and adapters: build it the same
    way, e.g. from the same seed). ``mesh``: a 1-D DeviceMesh (default: all ranks, on this
    process's device type), or 2-D (replicate, shard) for HSDP. ``mp_policy``: a
    ``MixedPrecisionPolicy`` (default none: compute in the parameters' own dtypes).
    ``activation_checkpointing``: recompute each decoder layer in backward (transformers'
    non-reentrant gradient checkpointing, so parameter names do not change).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_shardable(model)
    if not dist.is_initialized():
        raise RuntimeError("shard_lora_model needs a process group (torch.distributed.init_process_group; torchrun).")
    if mesh is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (dist.get_world_size(),))
    policy = mp_policy or MixedPrecisionPolicy()
    if activation_checkpointing:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model.model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    model.lock_structure(LOCK_REASON)
    return model
