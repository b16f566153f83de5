"""The training job with ``parallel.backend: fsdp2``: the Hugging Face model itself, sharded by
torch FSDP2 over every rank (DP = world size), from the same YAML as the megatron path.

    torchrun --nproc-per-node 2 -m dist_lora.cli train --config configs/fsdp2_small.yaml

Same data (raw text or instruction data through :mod:`dist_lora.data`), schedule
(:func:`dist_lora.train.lr_at`), step health (:mod:`dist_lora.train_health`), progress bar,
evaluation and summary as :mod:`dist_lora.train`; checkpoints are DCP
(:mod:`dist_lora.fsdp.checkpoint`, same ``latest`` / ``keep_last`` / ``--resume`` rules, at any
world size), and the last one is consolidated into ``<out_dir>/adapter`` at the end.

Loss: the mean over the trained tokens of the whole global batch (N tokens over all
micro-batches and ranks). Micro-batch m backpropagates ``sum_m · D / N`` (FSDP2 averages the
ranks' gradients, dividing by D), so grad_accum and the DP size do not change the numbers;
FSDP2 reduce-scatters once per step (gradient sync is off for all but the last micro-batch).
Packed instruction samples get their block-diagonal causal mask as a 4-D additive mask and
their restarted position ids.

Not here (refused by :mod:`dist_lora.train_config`): TP/PP, megatron attention, fp16, selective
recompute; PiSSA/OLoRA/CorDA/LoftQ/EVA inits (no release conversion on this path yet).
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from .checkpoint.training import (
    check_later_checkpoints, checkpoint_step, latest_checkpoint, move_aside_together, resolve_checkpoint,
)
from .config import ConfigError
from .data import Batch
from .fsdp import bf16_policy, shard_lora_model, trainable_parameters
from .fsdp.checkpoint import load_fsdp_checkpoint, save_fsdp_checkpoint
from .fsdp.meta import check_meta_config, load_sharded_lora_model
from .model import get_lora_model
from .parallel.device import backend_for, resolve_device, resolve_dtype
from .release.consolidate import consolidate
from .train import lr_at, prepare
from .train_config import TrainConfig
from .train_health import agree_on_step, handle_nonfinite
from .train_report import Throughput, log, model_flops_per_token, peak_memory_gib, write_summary


def hf_forward_kwargs(batch: Batch, dtype: torch.dtype) -> dict:
    """The HF model's inputs for ``batch``: tokens, and for packed samples their position ids
    and the block-diagonal causal mask as an additive [b, 1, s, s] mask in ``dtype``."""
    kwargs = {"input_ids": batch.tokens}
    blocked = batch.attention_mask()  # True where attention is not allowed
    if blocked is not None:
        mask = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
        kwargs["attention_mask"] = mask.masked_fill(blocked, torch.finfo(dtype).min)
        kwargs["position_ids"] = batch.position_ids
    return kwargs


def step_loss(model, batches: list, dtype: torch.dtype, forward_only: bool = False) -> float:
    """Forward (and backward) ``batches``; returns the global batch's mean loss over trained tokens."""
    device = next(model.parameters()).device
    batches = [Batch.of(b).to(device) for b in batches]
    trained = torch.stack([b.trained_tokens() for b in batches]).sum()
    dist.all_reduce(trained)
    scale = dist.get_world_size() / max(trained.item(), 1)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        if not forward_only:
            model.set_requires_gradient_sync(i == len(batches) - 1)
        logits = model(**hf_forward_kwargs(batch, dtype)).logits.float()
        per_token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.labels.clamp(min=0).flatten(), reduction="none"
        )
        loss = (per_token * batch.loss_mask().flatten()).sum() * scale
        if not forward_only:
            loss.backward()
        total += loss.detach().double()
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _evaluate(model, dataset, config: TrainConfig, dtype: torch.dtype) -> float:
    if dataset.sizes["eval"] == 0:
        return float("nan")
    dp, rank = dist.get_world_size(), dist.get_rank()
    batches = [dataset.batch("eval", i * dp + rank, config.train.micro_batch_size) for i in range(config.train.eval_batches)]
    model.eval()
    with torch.no_grad():
        loss = step_loss(model, batches, dtype, forward_only=True)
    model.train()
    return loss


def _build(config: TrainConfig, hf_dir: str, dtype: torch.dtype, device: torch.device):
    """The sharded model: built on the meta device with each rank loading only its rows
    (:mod:`dist_lora.fsdp.meta`) when the adapter config allows, else loaded whole on every
    rank and sharded (DoRA, modules_to_save)."""
    from transformers import AutoModelForCausalLM

    lora = config.lora_config()
    if not lora.init_kind.seeded:
        raise ConfigError(f"lora.init_lora_weights={lora.init_lora_weights!r} is not supported with "
                          "parallel.backend=fsdp2 yet; use true, false or gaussian.")
    options = dict(mp_policy=bf16_policy() if dtype == torch.bfloat16 else None,
                   activation_checkpointing=config.train.recompute == "full")
    try:
        check_meta_config(lora)
    except ConfigError:
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device)
        return shard_lora_model(get_lora_model(base, lora, seed=config.train.seed), **options)
    return load_sharded_lora_model(hf_dir, lora, dtype=dtype, seed=config.train.seed, device=device, **options)


def train_fsdp2(config: TrainConfig, resume: Optional[str] = None) -> dict:
    """Run the job in this process (one rank of a torchrun launch); returns a summary."""
    config.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.train.device)
    dtype = resolve_dtype(config.model.dtype, device)
    hf_dir, arch, dataset = prepare(config, world)
    t = config.train
    ckpt_root = os.path.join(t.out_dir, "checkpoints")
    resume_path = None
    if resume is not None:
        try:
            resume_path = resolve_checkpoint(resume or ckpt_root)
        except ConfigError as e:
            raise ConfigError(f"--resume: {e}") from None
    start = checkpoint_step(resume_path) if resume_path else 0
    check_later_checkpoints(ckpt_root, start, refuse=t.on_later_checkpoints == "refuse")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device))
    torch.manual_seed(t.seed)
    if t.on_later_checkpoints == "move_aside":
        moved = move_aside_together(ckpt_root, start)
        if moved:
            log(moved)
    dp, rank = dist.get_world_size(), dist.get_rank()
    model = _build(config, hf_dir, dtype, device)
    model.train()
    params = trainable_parameters(model)
    o = config.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    skipped: list[int] = []
    if resume_path is not None:
        state = load_fsdp_checkpoint(resume_path, model, optimizer)
        start, skipped = state["step"], list(state.get("skipped_steps", []))
        log(f"resumed from {resume_path} at step {start}")
    trainable = sum(p.numel() for p in params)  # DTensor numel is the global size
    total = sum(p.numel() for p in model.parameters())
    tokens_per_step = t.micro_batch_size * config.data.seq_len * t.grad_accum * dp
    speed = Throughput(tokens_per_step, model_flops_per_token(arch, config.data.seq_len, trainable), t.peak_tflops, world)
    log(f"dist_lora: {arch.model_type} {arch.num_layers} layers, hidden {arch.hidden_size} | FSDP2 DP={dp} on "
        f"{device.type} in {config.model.dtype}, recompute {t.recompute} | trainable {trainable:,} of {total:,} "
        f"parameters | {dataset.sizes['train']} training sequences of {config.data.seq_len} tokens")
    from tqdm.auto import tqdm

    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=rank != 0, desc="training")
    losses, last_eval, started, warm = {}, None, time.perf_counter(), None
    for step in bar:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [dataset.batch("train", (step * t.grad_accum + micro) * dp + rank, t.micro_batch_size)
                   for micro in range(t.grad_accum)]
        local_loss = step_loss(model, batches, dtype)
        norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip else float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        loss, finite = agree_on_step(local_loss, grad_norm, device)  # the same global mean on every rank
        if finite:
            optimizer.step()
            losses[step] = loss
        else:
            skipped.append(step)
            handle_nonfinite(step, loss, grad_norm, skipped, t, ckpt_root)
        optimizer.zero_grad(set_to_none=True)
        if step == start:
            warm = time.perf_counter()
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **speed.postfix(step + 1 - start, time.perf_counter() - started))
        done = step + 1
        if t.eval_interval and done % t.eval_interval == 0:
            last_eval = _evaluate(model, dataset, config, dtype)
            log(f"step {done}: train loss {loss:.4f}, eval loss {last_eval:.4f}")
        if (t.checkpoint_interval and done % t.checkpoint_interval == 0) or done == t.steps:
            save_fsdp_checkpoint(ckpt_root, done, model, optimizer, {"skipped_steps": skipped}, t.keep_last)
    bar.close()
    steps_run = t.steps - start
    summary = {
        "backend": "fsdp2",
        "losses": losses,
        "skipped_steps": skipped,
        "eval_loss": last_eval,
        "checkpoint": latest_checkpoint(ckpt_root),
        **(speed.figures(steps_run - 1, time.perf_counter() - warm) if steps_run > 1 and warm
           else speed.figures(max(steps_run, 1), time.perf_counter() - started)),
        "peak_memory_gib": peak_memory_gib(device),
        "hf_dir": hf_dir,
    }
    if t.consolidate and summary["checkpoint"]:
        out = os.path.join(t.out_dir, "adapter")
        if rank == 0:
            consolidate(summary["checkpoint"], out, hf_model_dir=hf_dir, overwrite=True, show_progress=False)
        dist.barrier()
        summary["adapter"] = out
    summary["summary"] = write_summary(t.out_dir, summary)
    dist.destroy_process_group()
    return summary
