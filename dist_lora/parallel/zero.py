"""ZeRO-3 awareness for LoRA layers: full shapes, gathering, and what a rank may change.

Under ZeRO stage 3 (``deepspeed.zero.Init``, or ``deepspeed.initialize`` with stage 3) every
parameter is cut into ``world_size`` flat pieces; ``param.data`` holds an empty tensor outside
a gather, the full shape is ``param.ds_shape`` and the piece is ``param.ds_tensor``. So:

- sizes come from :func:`full_shape` (``ds_shape``), never from ``param.shape``;
- code that reads a weight outside a module's own forward (weight-driven init, DoRA's norm,
  merging, saving) runs inside :func:`gathered`, DeepSpeed's ``GatheredParameters``;
- code that *rewrites* a weight (PiSSA/OLoRA's residual W - s·B·A, merging W + ΔW) gathers
  with ``modifier_rank=0``: every rank computes the same new value, rank 0's copy is
  broadcast and re-partitioned on exit, so the ranks cannot drift apart.

A LoRA layer reads its base weight and its factors directly in forward (the fused path, DoRA),
not only through submodule calls, so it is a ZeRO-3 *leaf module* (``_z3_leaf = True``,
DeepSpeed's flag): the whole layer (base weight, A, B, m) is fetched before its forward and
its gradients reduced after its backward. The flag is a plain attribute; without DeepSpeed it
does nothing. (A leaf whose input needs no gradient has its gradients reduced too early by
DeepSpeed; :func:`mark_leaf` explains the fix.)

Order: adapters must exist before ``deepspeed.initialize`` (it partitions them and hooks the
modules); adding one to a model an engine already manages is refused
(:func:`refuse_registered`). Saving gathers the adapter on every rank and writes on rank 0
(:func:`full_tensors`, :func:`single_writer`). ``merge_and_unload`` leaves merged, partitioned
weights in base layers that had no hooks of their own (they sat inside a leaf): gather them to
export (``GatheredParameters``), rather than running the old engine's forward on them.

FSDP2 (``fully_shard``, :mod:`dist_lora.fsdp`) shards parameters as DTensors: saving uses the
same two helpers (:func:`full_tensors` calls ``full_tensor()``, an all-gather of only the
tensors asked for; :func:`single_writer` lets rank 0 write).

Stages 1 and 2 partition only optimizer state (and gradients): parameters stay whole and
every helper here is a no-op. Nothing here imports DeepSpeed unless a ZeRO-3 parameter exists.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is managed (partitioned) by DeepSpeed ZeRO-3."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_shape")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's full (unpartitioned) shape: ``ds_shape`` under ZeRO-3, else ``shape``."""
    return torch.Size(param.ds_shape) if is_zero3_param(param) else param.shape


def has_zero3_params(module: torch.nn.Module) -> bool:
    return any(is_zero3_param(p) for p in module.parameters())


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def has_gathered_saves(module: torch.nn.Module) -> bool:
    """Whether a save must gather ``module``'s parameters on every rank and write on one:
    ZeRO-3 or FSDP2 (DTensor) parameters."""
    return any(is_zero3_param(p) or is_dtensor(p) for p in module.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None) -> Iterator[None]:
    """Full ``params`` on every rank inside the block (``deepspeed.zero.GatheredParameters``).

    ``modifier_rank=0``: changes made on rank 0 are kept (broadcast, re-partitioned) on exit;
    ``None``: read only, changes are discarded. A no-op when no parameter is a ZeRO-3 one, so
    callers need not know whether DeepSpeed is in use. Every rank must enter it (collective).
    """
    zero_params = [p for p in params if is_zero3_param(p)]
    if not zero_params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank):
        yield


def mark_leaf(module: torch.nn.Module) -> None:
    """Make ``module`` a ZeRO-3 leaf: DeepSpeed gathers all of its (sub)parameters before its
    forward. Must be set before ``deepspeed.initialize`` registers its hooks.

    DeepSpeed reduces a leaf's gradients in a *full backward hook*. When no input of the module
    requires grad (the first layer's projections: frozen embedding and norm), PyTorch fires
    that hook as soon as the output's gradient arrives, before the factors' gradients exist;
    DeepSpeed then reduces zeros and the later gradient no longer fits (``size of tensor a (0)
    must match...``). :func:`_input_requires_grad` makes the input require grad under ZeRO-3, so
    the hook fires after the layer's backward (cost: one unused input gradient there)."""
    module._z3_leaf = True
    module.register_forward_pre_hook(_input_requires_grad)


def _input_requires_grad(module: torch.nn.Module, args: tuple) -> Optional[tuple]:
    """Forward pre-hook: under ZeRO-3, a floating-point first input that does not require grad
    is replaced by a leaf that does (same values). Cheap no-op otherwise."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].requires_grad or not torch.is_grad_enabled():
        return None
    weight = getattr(module, "base_weight", None)
    if weight is None or not is_zero3_param(weight) or not args[0].is_floating_point():
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


def full_tensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: full, contiguous, detached copy}`` of ``params`` (gathered under ZeRO-3,
    ``full_tensor()`` of FSDP2's DTensors). The values must be the parameters themselves (not
    detached views: those lose DeepSpeed's attributes). Collective under ZeRO-3 and FSDP2:
    every rank must call it, with the same names in the same order."""
    with gathered(params.values()):
        return {
            name: (p.detach().full_tensor() if is_dtensor(p) else p.detach()).clone().contiguous()
            for name, p in params.items()
        }


@contextlib.contextmanager
def single_writer(model: torch.nn.Module) -> Iterator[bool]:
    """Yields whether this rank writes the files of a save every rank calls.

    Under ZeRO-3 or FSDP2 (in a process group of more than one rank) every rank holds the same gathered
    tensors: only global rank 0 writes, and on exit all ranks agree (one all-reduce of a flag)
    that it succeeded, so no rank returns before the files exist and a failure on rank 0 is an
    error on every rank instead of a hang. Otherwise: yields True, no collective.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and has_gathered_saves(model)):
        yield True
        return
    writes = dist.get_rank() == 0
    failed: Optional[BaseException] = None
    try:
        yield writes
    except BaseException as e:  # reported to the other ranks below, then re-raised here
        failed = e
    flag = torch.tensor([0 if failed is not None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if failed is not None:
        raise failed
    if not flag.item():
        raise RuntimeError("rank 0 failed to write the adapter files (its error says why); this save did not happen.")


def refuse_registered(module: torch.nn.Module, what: str) -> None:
    """Raise if a ZeRO-3 engine already manages ``module`` (``deepspeed.initialize`` gives every
    module it hooks an integer ``ds_id``; ``zero.Init`` alone does not): adapters added now
    would be invisible to it (not partitioned, not in its optimizer, not fetched in forward)."""
    if isinstance(getattr(module, "ds_id", None), int):
        raise ConfigError(
            f"{what}: this model is already wrapped by a DeepSpeed ZeRO-3 engine (deepspeed.initialize was "
            "called), which would neither partition nor train nor gather adapters added now. Add adapters "
            "first: build the model (under deepspeed.zero.Init), get_lora_model / add_adapter / load_adapter, "
            "then deepspeed.initialize (or dist_lora.deepspeed.initialize)."
        )
