"""Start torch.distributed and megatron's model-parallel state for a job launched by torchrun."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from .cpu_compat import apply_cpu_compat


def check_world_layout(
    world: int, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None, num_experts: Optional[int] = None
) -> None:
    """Raise ValueError (naming the sizes) unless the layout fits ``world`` ranks: TP×PP and
    EP×ETP×PP must divide it (etp None: megatron's default, TP), and ``num_experts`` (when
    given) must divide over EP. Pure arithmetic: call it before any process-group work."""
    etp = tp if etp is None else etp
    if min(tp, pp, ep, etp) < 1:
        raise ValueError(f"tp ({tp}), pp ({pp}), ep ({ep}) and etp ({etp}) must be >= 1.")
    if world % (tp * pp):
        raise ValueError(f"TP={tp} x PP={pp} does not divide the world size {world}.")
    if world % (ep * etp * pp):
        raise ValueError(
            f"expert layout EP={ep} x ETP={etp} x PP={pp} does not divide the world size {world} "
            "(each pipeline stage's ranks are split into expert-parallel x expert-tensor-parallel groups)."
        )
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"the expert count {num_experts} is not divisible by EP={ep}.")


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    ep: int = 1,
    etp: Optional[int] = None,
    num_experts: Optional[int] = None,
) -> None:
    """Init the default process group from torchrun's environment, apply the CPU
    compatibility layer when there is no GPU, and create megatron's TP/PP/DP groups and,
    for a mixture of experts, its expert-parallel (EP) and expert-tensor-parallel (ETP,
    None: TP) groups.

    Refuses a layout that does not fit the world size (:func:`check_world_layout`) before
    any group is created.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_world_layout(world, tp, pp, ep, etp, num_experts)
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_compat()
    if parallel_state.model_parallel_is_initialized():  # e.g. set up by the caller already
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        )
        if have != (tp, pp, ep, tp if etp is None else etp):
            raise ValueError(
                f"model parallel state is initialised with (TP, PP, EP, ETP)={have}, not ({tp}, {pp}, {ep}, {etp})."
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        )
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
