"""Small FSDP2 training runs shared by the FSDP2 tests: one tiny Llama with LoRA, a fixed global
batch per step split evenly over the data-parallel ranks, AdamW with gradient clipping."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_lora import LoraConfig, get_lora_model
from dist_lora.fsdp import shard_lora_model, trainable_parameters
from dist_lora.parallel.zero import full_tensors
from dist_lora.checkpoint.peft_format import adapter_state_dict
from tests.hf_models import sample_ids, tiny_llama

GLOBAL_BATCH = 4
SEQ = 8
MAX_NORM = 0.05  # below the tiny model's gradient norms: every step clips
LR = 1e-2


def lora_config(**overrides) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def build(config: LoraConfig | None = None, dtype: torch.dtype = torch.float32, **model_overrides):
    """The same LoRA model on every rank (fixed seeds; gaussian B so gradients reach A at step 1)."""
    base = tiny_llama(seed=0, **model_overrides).to(dtype)
    return get_lora_model(base, config or lora_config(), seed=7)


def batch(step: int) -> torch.Tensor:
    return sample_ids(GLOBAL_BATCH, SEQ, seed=100 + step)


def local_batch(step: int) -> torch.Tensor:
    """This rank's share of step ``step``'s global batch (the whole batch without a process group)."""
    ids = batch(step)
    if not dist.is_initialized():
        return ids
    return ids.chunk(dist.get_world_size())[dist.get_rank()]


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable_parameters(model), lr=LR, weight_decay=0.01)


def train(model, optimizer, steps: range, clip=torch.nn.utils.clip_grad_norm_) -> list[tuple[float, float]]:
    """(global mean loss, gradient norm before clipping) per step."""
    out = []
    for step in steps:
        ids = local_batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = clip(trainable_parameters(model), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().float().clone()
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= dist.get_world_size()
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        out.append((value.item(), float(norm)))
    return out


def adapter(model) -> dict[str, torch.Tensor]:
    """The full adapter tensors (gathered from the shards under FSDP2; every rank calls it)."""
    return full_tensors(adapter_state_dict(model, "default", keep_vars=True))


def fsdp_run(steps: int = 3, mp_policy=None, dtype=torch.float32, activation_checkpointing=False, clip=None,
             config=None, prepare=None, mesh_shape=None):
    """On every rank: build (``prepare(model)`` next, e.g. a second adapter), shard, train
    ``steps`` steps; returns (losses and norms, adapter)."""
    model = build(config, dtype=dtype)
    if prepare is not None:
        prepare(model)
    mesh = None
    if mesh_shape is not None:  # (replicate, shard): HSDP
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    model = shard_lora_model(model, mesh=mesh, mp_policy=mp_policy, activation_checkpointing=activation_checkpointing)
    model.train()
    history = train(model, make_optimizer(model), range(steps), **({} if clip is None else {"clip": clip}))
    return history, adapter(model)


def reference_run(steps: int = 3, config=None, prepare=None) -> tuple[list, dict]:
    """One process, no FSDP, the whole global batch per step."""
    model = build(config)
    if prepare is not None:
        prepare(model)
    model.train()
    history = train(model, make_optimizer(model), range(steps))
    return history, adapter(model)


def resumed_run(root: str, start: int, stop: int, save_every: int = 1, keep_last=2, config=None):
    """Shard, resume from ``root`` when ``start`` > 0, train steps [start, stop) saving a DCP
    checkpoint after each ``save_every`` steps; returns the losses."""
    from dist_lora.fsdp.checkpoint import load_fsdp_checkpoint, save_fsdp_checkpoint

    model = shard_lora_model(build(config))
    model.train()
    optimizer = make_optimizer(model)
    if start:
        state = load_fsdp_checkpoint(root, model, optimizer)
        assert state["step"] == start, state
    losses = []
    for step in range(start, stop):
        losses.append(train(model, optimizer, range(step, step + 1))[0][0])
        if (step + 1) % save_every == 0:
            save_fsdp_checkpoint(root, step + 1, model, optimizer, keep_last=keep_last)
    return losses


def released_run(root: str, adapter_dir: str, world_steps: int = 3, config=None):
    """Train, save a DCP checkpoint and a PEFT adapter (save_pretrained on every rank); returns
    the trained model's logits on :func:`batch` (0) in eval mode."""
    from dist_lora.fsdp.checkpoint import save_fsdp_checkpoint

    model = shard_lora_model(build(config))
    model.train()
    optimizer = make_optimizer(model)
    train(model, optimizer, range(world_steps))
    save_fsdp_checkpoint(root, world_steps, model, optimizer)
    model.save_pretrained(adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch(0)).logits


def meta_run(hf_dir: str, steps: int = 3, config=None):
    """As :func:`fsdp_run`, the model built on meta and loaded rank-locally (dist_lora.fsdp.meta)."""
    from dist_lora.fsdp.meta import load_sharded_lora_model

    model = load_sharded_lora_model(hf_dir, config or lora_config(), seed=7)
    model.train()
    history = train(model, make_optimizer(model), range(steps))
    return history, adapter(model)


def async_saved_run(root: str, steps: int = 3):
    """Train, start an asynchronous save after step 1 and keep training (the parameters change
    while it writes), wait; returns the losses."""
    from dist_lora.fsdp.checkpoint import async_save_fsdp_checkpoint

    model = shard_lora_model(build())
    model.train()
    optimizer = make_optimizer(model)
    losses = [train(model, optimizer, range(0, 1))[0][0]]
    pending = async_save_fsdp_checkpoint(root, 1, model, optimizer)
    losses += [loss for loss, _ in train(model, optimizer, range(1, steps))]
    pending.wait()
    return losses


def converted_release_run(initial_dir: str, adapter_dir: str, steps: int = 2):
    """PiSSA under FSDP2: save the initial adapter, train, save converted to plain LoRA for the
    original base; returns the trained model's logits on :func:`batch` (0)."""
    model = shard_lora_model(build(lora_config(init_lora_weights="pissa")))
    model.save_pretrained(initial_dir)
    model.train()
    train(model, make_optimizer(model), range(steps))
    model.save_pretrained(adapter_dir, path_initial_model_for_weight_conversion=initial_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch(0)).logits
