"""A megatron tensor-parallel LoRA model under DeepSpeed ZeRO-1/2 data parallelism.

    engine, optimizer, _, _ = deepspeed_initialize_megatron(lora_model, ds_config)
    loss = engine(tokens, position_ids=None, attention_mask=None, labels=labels).mean()
    engine.backward(loss)
    engine.step()

DeepSpeed sees megatron's groups through :class:`MegatronMPU` (its ``mpu`` interface: data
parallel = megatron's DP group, model parallel = megatron's TP×PP group, so gradient norms
are summed over TP, with replicated parameters counted once: DeepSpeed counts a parameter
without ``tensor_model_parallel`` on model-parallel rank 0 only).

The trap: with ``tp_comm="fused"`` (the default) the replicated factors (A of column-parallel
layers, B of row-parallel ones; see :mod:`dist_lora.layers.fused`) get a *partial* gradient on
each TP rank: dA = Σ_i dA_i over TP ranks i. Without DeepSpeed,
:func:`~dist_lora.parallel.grads.finalize_lora_grads` sums them in one flat all-reduce per
step. Under DeepSpeed the sum must happen before ZeRO consumes the gradients:

* ZeRO-1 (``stage 1``, fp32, without ``overlap_comm``; also stage 0): gradients stay in
  ``param.grad`` until the engine's ``allreduce_gradients`` at the accumulation boundary. It is
  wrapped to call ``finalize_lora_grads`` first: **one** flattened all-reduce over TP per step,
  carrying every partial gradient (4·L·r·h elements for L layers with qkv, proj, fc1 and fc2
  adapted), as without DeepSpeed.
* ZeRO-2 (and ZeRO-1 with ``overlap_comm``, a ``grad_accum_dtype`` or bf16/fp16): DeepSpeed copies each
  gradient into its reduce buckets from a post-accumulate-grad hook during backward, so no later
  point sees ``param.grad``. A tensor hook on every partial-gradient parameter all-reduces the
  *incoming* gradient over TP before it is accumulated (tensor hooks run before accumulation,
  hence before DeepSpeed's hook, whatever the registration order; summing only the incoming
  micro-batch's gradient keeps gradient accumulation right even when ``param.grad`` still
  holds earlier, already summed micro-batches). Cost: one all-reduce of r·h elements per
  replicated factor per micro-batch, i.e. one per adapted linear layer (4 per transformer
  layer) — the same bytes as the bucketed sum, but not bucketed (latency-bound at scale), and
  repeated per micro-batch. ``tp_comm="reference"`` makes every gradient complete instead (no
  hook) at the price of r·tokens-sized activation all-reduces in every layer, forward and
  backward; once the tokens per micro-batch exceed the hidden size the hook's weight-sized
  all-reduce is the cheaper of the two.

Why not after ZeRO's reduction (the design note's "ride on the DP all-reduce")? The DP
reduction is linear, so summing over TP after it would be right too, but by then the gradients
live in ZeRO's private flat partitions and the gradient norm (clipping) has been computed from
the partial values; hooking there means depending on DeepSpeed internals.

Megatron's own ``sequence_parallel`` parameters (norm weights under SP) are partial too and
are summed by the same mechanism. Pipeline parallelism needs DeepSpeed's pipeline engine and
is refused; ZeRO-3 partitions megatron's TP-sharded weights again and is not supported here.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..parallel.grads import finalize_lora_grads, tp_partial_grad_parameters


class MegatronMPU:
    """megatron-core's ``parallel_state`` under the names DeepSpeed's ``mpu`` argument uses."""

    def __init__(self) -> None:
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ps.get_pipeline_model_parallel_world_size()


def _zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def _grads_consumed_in_backward(config: dict) -> bool:
    """Whether DeepSpeed may take gradients out of ``param.grad`` during backward (see module
    docstring): stage 2 (partitioned gradients), ``overlap_comm``, a separate gradient
    accumulation dtype (each gradient moves into ``param.grad_accum``), or 16-bit training
    (DeepSpeed's bf16/fp16 optimizers may accumulate into fp32 copies from hooks). The hooks
    are right in every case; the bucketed sum is taken only where it is certainly right."""
    zero = config.get("zero_optimization") or {}
    grad_accum_dtype = (config.get("data_types") or {}).get("grad_accum_dtype")
    half = any((config.get(key) or {}).get("enabled") for key in ("bf16", "fp16"))
    return _zero_stage(config) >= 2 or bool(zero.get("overlap_comm")) or grad_accum_dtype is not None or half


def add_tp_grad_hooks(model: torch.nn.Module, group: Optional[dist.ProcessGroup] = None) -> int:
    """Register, on every parameter whose gradient is a partial sum over TP, a tensor hook
    that all-reduces each incoming gradient over ``group`` (default: megatron's TP group)
    before it is accumulated into ``param.grad``. Returns how many hooks were added."""
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return 0
    params = tp_partial_grad_parameters(model)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone(memory_format=torch.contiguous_format)  # never write into autograd's buffer
        dist.all_reduce(summed, group=group)
        return summed

    for param in params:
        param.register_hook(hook)
    return len(params)


def _sum_before_allreduce(engine: Any, model: torch.nn.Module) -> None:
    """ZeRO-1: one bucketed TP sum right before the engine's DP reduction at the boundary."""
    inner: Callable = engine.allreduce_gradients

    def allreduce_gradients(self, *args, **kwargs):
        if self.is_gradient_accumulation_boundary():
            finalize_lora_grads(model)
        return inner(*args, **kwargs)

    engine.allreduce_gradients = types.MethodType(allreduce_gradients, engine)


def deepspeed_initialize_megatron(
    model: torch.nn.Module,
    config: dict | str | os.PathLike,
    model_parameters: Optional[list] = None,
    optimizer: Any = None,
    **kwargs: Any,
):
    """``deepspeed.initialize`` for a megatron TP model with LoRA (ZeRO stage 0, 1 or 2):
    megatron's groups as ``mpu``, and the TP sum of partial LoRA gradients placed where the
    stage allows (see the module docstring). ``model_parameters`` defaults to the trainable
    parameters. ``config`` is a DeepSpeed config dict or JSON file. Returns what
    ``deepspeed.initialize`` returns."""
    import deepspeed

    if not isinstance(config, dict):
        with open(config) as f:
            config = json.load(f)

    mpu = MegatronMPU()
    if mpu.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError(
            "deepspeed_initialize_megatron supports tensor and data parallelism only (pipeline size "
            f"{mpu.get_pipeline_model_parallel_world_size()}); use megatron's own pipeline schedule."
        )
    if _zero_stage(config) > 2:
        raise ValueError(
            "ZeRO-3 would partition megatron's tensor-parallel shards again; use ZeRO stage 1 or 2 with TP models."
        )
    if _grads_consumed_in_backward(config):
        add_tp_grad_hooks(model)
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    out = deepspeed.initialize(
        model=model, model_parameters=model_parameters, optimizer=optimizer, config=config, mpu=mpu, **kwargs
    )
    if not _grads_consumed_in_backward(config):
        if getattr(out[1], "use_grad_accum_attribute", False):  # a DeepSpeed default we did not foresee
            raise RuntimeError(
                "DeepSpeed moves gradients out of param.grad during backward with this config; set "
                "zero_optimization.overlap_comm=true so that the partial LoRA gradients are summed by hooks."
            )
        _sum_before_allreduce(out[0], model)
    return out
