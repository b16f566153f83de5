"""Where a job runs and in which precision: ``train.device`` and ``model.dtype``, resolved once,
before any process group.

    auto  CUDA when available (each rank on its LOCAL_RANK's GPU), else CPU
    cuda  CUDA; refused with a clear error where there is none
    cpu   CPU processes with gloo (megatron through dist_lora's CPU compatibility layer)

The model is built on this device (each rank's slices copied from safetensors straight into
device tensors), batches move there, and every collective of the training loop uses tensors on
it (NCCL takes CUDA tensors only).
"""

from __future__ import annotations

import os

import torch

from ..config import ConfigError


def resolve_device(name: str) -> torch.device:
    """The job's device for ``train.device`` ``name``; ConfigError for cuda without CUDA."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but this machine has no usable CUDA device; use train.device=cpu or auto.")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def backend_for(device: torch.device) -> str:
    """The process-group backend for ``device``: NCCL on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def build_overrides(device: torch.device) -> dict:
    """megatron TransformerConfig fields that place the model on ``device``: on CUDA megatron
    allocates each rank's parameters on its current GPU (no host copy of the model)."""
    return {"use_cpu_initialization": device.type == "cpu"}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype for ``model.dtype`` ``name`` on ``device`` (adapters stay fp32
    masters with fp32 optimizer state and compute in this dtype; gradients are summed and
    clipped in fp32)."""
    if name not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}.")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype is bf16 but this GPU does not support bf16; use model.dtype: fp16 (loss-scaled).")
    return DTYPES[name]


def dtype_overrides(dtype: torch.dtype) -> dict:
    """megatron TransformerConfig fields for a base in ``dtype`` (bf16 / fp16: megatron's
    half-precision mode, softmax in fp32)."""
    return {"params_dtype": dtype, "pipeline_dtype": dtype, "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}
