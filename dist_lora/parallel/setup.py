"""Start torch.distributed and megatron's model-parallel state for a job launched by torchrun."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from .cpu_compat import apply_cpu_compat


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str | None = None) -> None:
    """Init the default process group from torchrun's environment, apply the CPU
    compatibility layer when there is no GPU, and create megatron's TP/PP/DP groups.

    Refuses a layout that does not fit the world size before any group is created.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise ValueError(f"TP={tp} x PP={pp} does not divide the world size {world}.")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_compat()
    if parallel_state.model_parallel_is_initialized():  # e.g. set up by the caller already
        have = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise ValueError(f"model parallel state is initialised with (TP, PP)={have}, not ({tp}, {pp}).")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def pipeline_group() -> Optional[dist.ProcessGroup]:
    """megatron's pipeline group when there is more than one stage, else None (also without
    megatron-core, or before its model-parallel state is initialised)."""
    try:
        from megatron.core import parallel_state  # optional and heavy: imported on use
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_pipeline_model_parallel_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
