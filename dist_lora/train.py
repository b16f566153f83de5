"""The training job: ``dist-lora train --config FILE.yaml [--resume [CKPT]] [key=value ...]``,
run under torchrun (one process per rank).

Every check that can fail (config keys, layout against the model, data) runs on every rank
before any process-group work, so bad input gives the same clear error everywhere instead of
a hang. Rank 0 prints the summary, the progress bar and the evaluation lines.

The model is built on ``train.device`` in ``model.dtype`` (:mod:`dist_lora.parallel.device`;
fp16 with :mod:`~dist_lora.parallel.loss_scale`), with ``model.attention`` and
``train.recompute``. Each step's loss and gradient norm are agreed by all ranks in one
all-reduce (:mod:`dist_lora.train_health`: a non-finite one stops the run or skips the step).
A run owns the checkpoints after its start step (``train.on_later_checkpoints`` in
:mod:`dist_lora.train_config`). Throughput and ``summary.json``: :mod:`dist_lora.train_report`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from .bridges import build_megatron_gpt, check_parallel_layout, parse_hf_config, read_hf_config
from .checkpoint.sharded import read_manifest, save_sharded
from .checkpoint.training import (
    check_later_checkpoints, checkpoint_step, latest_checkpoint, load_checkpoint, move_aside_together, resolve_checkpoint,
    save_checkpoint,
)
from .config import ConfigError
from .data import Batch, load_tokenizer
from .data.source import open_dataset
from .io import atomic_path
from .model import get_lora_model
from .parallel.device import backend_for, build_overrides, dtype_overrides, resolve_device, resolve_dtype
from .parallel.grads import allreduce_data_parallel_grads, clip_grad_norm_, finalize_lora_grads
from .parallel.loss_scale import DynamicLossScale
from .parallel.recompute import inputs_require_grad, recompute_settings
from .parallel.setup import init_distributed, is_rank0, shutdown_distributed
from .release.consolidate import consolidate
from .tiny_model import builtin_model_dir
from .train_config import TrainConfig
from .train_health import agree_on_step, handle_nonfinite
from .train_report import Throughput, data_summary, log, model_flops_per_token, peak_memory_gib, write_summary

PROBE_BATCH = 2  # sequences of the held-out probe whose logits are saved for verification


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to optim.lr, then constant, linear or cosine decay to lr·min_lr_ratio."""
    o, total = config.optim, config.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant" or total <= o.warmup_steps:
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    decay = 1 - progress if o.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * decay)


def model_identity(arch) -> dict:
    """The facts a resumed checkpoint must share with the model."""
    keys = ("model_type", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "vocab_size")
    return {k: getattr(arch, k) for k in keys}


def prepare(config: TrainConfig, world_size: int):
    """Everything that can be checked before process groups exist: (hf_dir, arch, dataset)."""
    p = config.parallel
    tp, pp = p.tp, p.pp
    if world_size % (tp * pp):
        raise ConfigError(f"parallel.tp ({tp}) x parallel.pp ({pp}) does not divide the world size ({world_size}).")
    if world_size % (p.ep * p.etp * pp):
        raise ConfigError(
            f"parallel.ep ({p.ep}) x parallel.etp ({p.etp}) x parallel.pp ({pp}) does not divide the world size "
            f"({world_size})."
        )
    hf_dir = config.model.hf_dir or builtin_model_dir(kind=config.model.builtin)
    arch = parse_hf_config(read_hf_config(hf_dir))
    check_parallel_layout(arch, tp, pp, p.ep, p.etp, p.sp)
    if config.model.moe_aux_loss_coeff is not None and not arch.num_experts:
        raise ConfigError(f"model.moe_aux_loss_coeff is set but this {arch.model_type} model has no experts.")
    tokenizer = load_tokenizer(config.model.hf_dir)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {arch.vocab_size}.")
    dataset = open_dataset(config.data, tokenizer, os.path.join(config.train.out_dir, "data_cache"))
    return hf_dir, arch, dataset


def run_microbatches(model, batches: list, config: TrainConfig, forward_only: bool = False) -> float:
    """Forward (and backward) ``batches`` through megatron's schedule for this layout
    (1F1B across pipeline stages when PP > 1, plain gradient accumulation otherwise).

    The loss is the mean over the trained tokens (label != IGNORE) of the whole global batch:
    all M micro-batches of all D data-parallel ranks, N tokens in all. Micro-batch m returns
    ``sum_m · M · D / N``: megatron's schedule divides it by M and the data-parallel gradient
    average by D, so the gradient is that of ``sum / N`` and grad_accum, the DP size and
    packing do not change the numbers. Returns this rank's share of the loss (the global mean
    once averaged over the data-parallel group), known on every rank of the replica."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device
    batches = [Batch.of(b).to(device) for b in batches]
    group = parallel_state.get_data_parallel_group()
    trained = torch.stack([b.trained_tokens() for b in batches]).sum()  # int64: exact at any batch size
    dist.all_reduce(trained, group=group)
    scale = len(batches) * dist.get_world_size(group) / max(trained.item(), 1.0)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        per_token = model(batch.tokens, position_ids=batch.position_ids, attention_mask=batch.attention_mask(),
                          labels=batch.labels.clamp(min=0))  # IGNORE labels: any valid id, masked below
        mask = batch.loss_mask()

        def loss_func(output):
            loss = (output.float() * mask).sum() * scale
            return loss, {"loss": loss.detach().clone()}  # megatron divides `loss` in place

        return per_token, loss_func

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=config.data.seq_len,
        micro_batch_size=config.train.micro_batch_size, forward_only=forward_only,
    )
    loss = torch.zeros((), device=device)
    if parallel_state.is_pipeline_last_stage():
        loss += torch.stack([o["loss"] for o in outputs]).mean()
    dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())  # from the last stage
    return loss.item()


def _evaluate(model, dataset, config: TrainConfig, dp: int, dp_rank: int) -> float:
    if dataset.sizes["eval"] == 0:
        return float("nan")
    model.eval()
    batches = [dataset.batch("eval", i * dp + dp_rank, config.train.micro_batch_size) for i in range(config.train.eval_batches)]
    with torch.no_grad():
        loss = torch.tensor(run_microbatches(model, batches, config, forward_only=True), device=_device(model))
    model.train()
    from megatron.core import parallel_state

    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / dp


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _global_numel(model, trainable: bool) -> int:
    """Parameters of the whole model (all TP shards, all experts, all pipeline stages). An
    expert parameter (megatron marks it ``allreduce=False``) is split over expert-TP and each
    expert-parallel rank holds as many experts as the others, except an adapter shared by all
    experts of a layer (``ep_partial_grad``): every EP rank holds the same one, counted once.
    (``model.parameters()`` already yields a parameter tied to several local experts once.)"""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()

    def copies(p) -> int:
        expert = not getattr(p, "allreduce", True)
        split = getattr(p, "tensor_model_parallel", False)
        owners = 1 if getattr(p, "ep_partial_grad", False) else ep
        return (owners * (etp if split else 1)) if expert else (tp if split else 1)

    count = torch.tensor(sum(p.numel() * copies(p) for p in model.parameters() if p.requires_grad == trainable),
                         device=_device(model))
    dist.all_reduce(count, group=parallel_state.get_pipeline_model_parallel_group())
    return int(count.item())


def train(config: TrainConfig, resume: Optional[str] = None) -> dict:
    """Run the job in this process (one rank of a torchrun launch); returns a summary."""
    from megatron.core import parallel_state  # megatron (heavy) is imported on use


    config.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.train.device)
    dtype = resolve_dtype(config.model.dtype, device)
    hf_dir, arch, dataset = prepare(config, world)
    p, t = config.parallel, config.train
    ckpt_root, identity = os.path.join(t.out_dir, "checkpoints"), model_identity(arch)
    resume_path = _resume_checkpoint(resume, ckpt_root, identity)
    start = checkpoint_step(resume_path) if resume_path else 0
    # a run owns the steps after its start: later checkpoints are refused here (every rank, no
    # process group yet) or moved aside by rank 0 once the group exists
    check_later_checkpoints(ckpt_root, start, refuse=t.on_later_checkpoints == "refuse")
    init_distributed(tp=p.tp, pp=p.pp, seed=t.seed, backend=backend_for(device), ep=p.ep,
                     etp=p.etp if arch.num_experts else None)
    if t.on_later_checkpoints == "move_aside":  # rank 0 looks and moves, every rank learns the outcome
        moved = move_aside_together(ckpt_root, start)
        if moved:
            log(moved)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    moe = {} if config.model.moe_aux_loss_coeff is None else {"moe_aux_loss_coeff": config.model.moe_aux_loss_coeff}
    base = build_megatron_gpt(hf_dir, tp=p.tp, pp=p.pp, sequence_parallel=p.sp, attention=config.model.attention, ep=p.ep, **moe,
                              **build_overrides(device), **dtype_overrides(dtype), **recompute_settings(t.recompute))
    model = get_lora_model(base, config.lora_config(), seed=t.seed)
    if t.recompute == "full":
        inputs_require_grad(model)  # megatron's recompute needs an input that requires grad
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay)
    initial = _save_initial_adapter(model, t.out_dir) if resume_path is None else _initial_adapter_dir(model, t.out_dir)
    skipped = []
    if resume_path is not None:
        state = load_checkpoint(resume_path, model, optimizer)
        start, skipped = state["step"], list(state.get("skipped_steps", []))
        log(f"resumed from {resume_path} at step {start}")
    trainable, frozen = _global_numel(model, True), _global_numel(model, False)
    tokens_per_step = t.micro_batch_size * config.data.seq_len * t.grad_accum * dp
    speed = Throughput(tokens_per_step, model_flops_per_token(arch, config.data.seq_len, trainable), t.peak_tflops, world)
    log(
        f"dist_lora: {arch.model_type} {arch.num_layers} layers, hidden {arch.hidden_size} | layout TP={p.tp} "
        f"PP={p.pp} DP={dp} SP={p.sp}{f' EP={p.ep} ETP={p.etp}' if arch.num_experts else ''} on {device.type} in {config.model.dtype}, {config.model.attention} attention, recompute {t.recompute} | trainable {trainable:,} of {trainable + frozen:,} parameters "
        f"({100 * trainable / (trainable + frozen):.3f}%), adapter {trainable * 4 / 2**20:.2f} MB (fp32) | "
        f"{dataset.sizes['train']} training sequences of {config.data.seq_len} tokens"
    )
    if getattr(dataset, "stats", None):
        log(data_summary(dataset.stats))
    from tqdm.auto import tqdm

    scaler = DynamicLossScale(t.initial_loss_scale, t.min_loss_scale) if dtype == torch.float16 else None
    if scaler is not None:
        model.config.grad_scale_func = scaler.scale_loss  # megatron's schedule scales what backward starts from
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=not is_rank0(), desc="training")
    losses, last_eval, started = {}, None, time.perf_counter()
    for step in bar:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [
            dataset.batch("train", (step * t.grad_accum + micro) * dp + dp_rank, t.micro_batch_size)
            for micro in range(t.grad_accum)
        ]
        local_loss = run_microbatches(model, batches, config)
        finalize_lora_grads(model)
        allreduce_data_parallel_grads(model)
        if scaler is not None:
            scaler.unscale_(params)
        grad_norm = clip_grad_norm_(model, config.optim.grad_clip)
        loss, finite = agree_on_step(local_loss, grad_norm, device)
        if finite:
            optimizer.step()
            losses[step] = loss
        elif scaler is not None and math.isfinite(loss):  # an fp16 overflow: skip, and back off the scale
            log(f"step {step + 1}: fp16 gradients overflowed at loss scale {scaler.scale:g}; step skipped")
        else:
            skipped.append(step)
            handle_nonfinite(step, loss, grad_norm, skipped, t, ckpt_root)
        if scaler is not None:
            scaler.update(finite)
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        if step == start:
            warm = time.perf_counter()  # throughput in the summary leaves out the first (warm-up) step
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", **speed.postfix(step + 1 - start, elapsed),
                        **({"skipped": len(skipped)} if skipped else {}),
                        **({"overflows": scaler.overflows} if scaler is not None and scaler.overflows else {}))
        done = step + 1
        if t.eval_interval and done % t.eval_interval == 0:
            last_eval = _evaluate(model, dataset, config, dp, dp_rank)
            log(f"step {done}: train loss {loss:.4f}, eval loss {last_eval:.4f}")
        if (t.checkpoint_interval and done % t.checkpoint_interval == 0) or done == t.steps:
            trainer_state = {"model": identity, "config": config.to_dict(), "skipped_steps": skipped}
            save_checkpoint(ckpt_root, done, model, optimizer, trainer_state, t.keep_last)
    bar.close()
    elapsed = time.perf_counter() - started
    summary = {
        "losses": losses,
        "skipped_steps": skipped,
        "fp16_overflow_steps": scaler.overflows if scaler is not None else None,
        "eval_loss": last_eval,
        "checkpoint": latest_checkpoint(ckpt_root),
        **(speed.figures(t.steps - start - 1, time.perf_counter() - warm) if t.steps - start > 1
           else speed.figures(1, elapsed)),
        "peak_memory_gib": peak_memory_gib(device),
        "hf_dir": hf_dir,
        "trainable_parameters": trainable,
    }
    if skipped:
        log(f"{len(skipped)} step(s) skipped for a non-finite loss or gradient norm: {[s + 1 for s in skipped]}")
    summary["probe"] = _save_probe_logits(model, dataset, config, t.out_dir)
    if t.consolidate and summary["checkpoint"]:
        summary["adapter"] = _consolidate(summary["checkpoint"], os.path.join(t.out_dir, "adapter"), hf_dir, initial)
    summary["summary"] = write_summary(t.out_dir, summary)
    shutdown_distributed()
    return summary


def _resume_checkpoint(resume: Optional[str], ckpt_root: str, identity: dict) -> Optional[str]:
    """The complete checkpoint ``--resume`` names (a step directory or a root; empty: this
    run's checkpoint root), checked against the model; None for a fresh run."""
    if resume is None:
        return None
    try:
        path = resolve_checkpoint(resume or ckpt_root)
    except ConfigError as e:
        raise ConfigError(f"--resume: {e}") from None
    _check_resume_identity(path, identity)
    return path


def _check_resume_identity(path: str, identity: dict) -> None:
    saved = read_manifest(path, verify=False).get("trainer_state", {}).get("model")
    if saved is not None and saved != identity:
        diff = {k: (saved.get(k), identity.get(k)) for k in identity if saved.get(k) != identity.get(k)}
        raise ConfigError(
            f"checkpoint {path} is from another model: " + ", ".join(f"{k} {a} in the checkpoint, {b} now" for k, (a, b) in diff.items())
        )


def _save_probe_logits(model, dataset, config: TrainConfig, out_dir: str) -> str:
    """Write the megatron model's full-vocabulary logits on a fixed held-out batch (from the
    last pipeline stage), so that the consolidated adapter can be checked in another process."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from safetensors.torch import save_file

    tokens = Batch.of(dataset.batch("eval" if dataset.sizes["eval"] else "train", 0, PROBE_BATCH)).tokens
    tokens = tokens.to(_device(model))

    def forward_step(data_iterator, model):
        logits = model(next(data_iterator), position_ids=None, attention_mask=None)  # [b, s, vocab / tp]
        return logits, lambda out: (out.sum() * 0, {"logits": out.detach()})

    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=PROBE_BATCH, forward_only=True,
        )
    path = os.path.join(out_dir, "probe_logits.safetensors")
    if parallel_state.is_pipeline_last_stage():
        logits = outputs[0]["logits"]
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.contiguous(), group=group)
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            with atomic_path(path) as tmp:
                save_file({"tokens": tokens.cpu(), "logits": torch.cat(parts, dim=-1).float().cpu()}, tmp)
    dist.barrier()
    return path


def _initial_adapter_dir(model, out_dir: str) -> Optional[str]:
    """Where a PiSSA/OLoRA/CorDA run keeps its adapter as initialised (None for other inits)."""
    convertible = model.peft_config["default"].init_kind.convertible
    return os.path.join(out_dir, "initial_adapter") if convertible else None


def _save_initial_adapter(model, out_dir: str) -> Optional[str]:
    """Save the adapter before training when its init rewrote the base weights, so that the
    consolidated release is a plain LoRA adapter for the original base model."""
    path = _initial_adapter_dir(model, out_dir)
    if path is not None:
        save_sharded(model, path)
    return path


def _consolidate(checkpoint: str, out: str, hf_dir: str, initial: Optional[str] = None) -> str:
    if dist.get_rank() == 0:
        consolidate(checkpoint, out, hf_model_dir=hf_dir, overwrite=True, show_progress=False, initial_checkpoint_dir=initial)
    dist.barrier()
    return out
