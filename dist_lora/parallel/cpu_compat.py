"""Run megatron-core on a machine without CUDA (CPU tensors, gloo collectives).

megatron-core assumes a GPU in a few places that the CPU path still reaches. On a CPU-only
torch these calls raise ``AssertionError: Torch not compiled with CUDA enabled`` (or, for
``torch.cuda.manual_seed``, are silently queued and never run). :func:`apply_cpu_compat`
redirects exactly those calls to the CPU; it does nothing when CUDA is available.

Patches (all made once per process, only when ``torch.cuda.is_available()`` is False):

1. ``torch.cuda.current_device`` returns the CPU device. megatron allocates with
   ``device=torch.cuda.current_device()``: the all-gather/reduce-scatter outputs in
   ``tensor_parallel.mappings``, ``GlobalMemoryBuffer`` (sequence-parallel gathers in the
   parallel linears), rotary ``inv_freq``, ...
2. ``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed`` act on the CPU default
   generator. The RNG tracker's ``add`` (called by ``model_parallel_cuda_manual_seed``) seeds
   and reads a "cuda" generator with them. ``set_rng_state`` goes with ``get_rng_state`` so that
   megatron's save/restore pairs (rerun state machine, RNG checkpoints) restore what they saved
   instead of silently doing nothing. Consequence: ``model_parallel_cuda_manual_seed(s)`` also
   reseeds the CPU generator with ``s`` (on GPU it reseeds the CUDA one).
3. megatron's ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` act on
   the CPU default generator. ``CudaRNGStatesTracker.fork`` (entered by attention even at
   dropout 0) swaps states with them; they go through ``torch.cuda.random`` and
   ``torch.cuda.default_generators`` directly, so patch 2 does not reach them.
4. ``fused_softmax.get_default_causal_mask`` builds the mask on CPU. The unfused softmax of
   the local ``DotProductAttention`` calls it whenever ``attention_mask`` is None (causal
   attention), and megatron's version hardcodes ``device="cuda"``.
5. The pipeline schedules (``pipeline_parallel.schedules``) see a ``torch`` whose ``zeros``
   builds ``device="cuda"`` tensors on the CPU (their token counters hardcode it), and
   ``torch.cuda.synchronize`` is a no-op (p2p communication calls it after batched sends).
6. A logging filter drops megatron's "CPU RNG state changed within GPU RNG context" warning:
   with patch 3 the "GPU" generator *is* the CPU one, so any random op inside ``fork()``
   (dropout at p > 0) changes it by design and the warning would fire on every such call.
7. MoE all-to-all token dispatcher: it copies its split sizes to the host on a side CUDA
   stream (``torch.cuda.Stream``, ``current_stream``, ``stream``, ``record_event``): on the CPU
   these become one no-op stream (the copies are already on the host), and
   ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` returns host tensors as numpy arrays as it
   does for device tensors (``all_to_all_single`` takes a sequence of ints, not a tensor).

Without Transformer Engine (also on a GPU), megatron-core 0.16's MoE router refers to an
undefined ``te_general_gemm`` (its import sits in the TE-only branch): :func:`apply_cpu_compat`
defines it as None, which selects megatron's own torch matmul path. This one fix is applied
with or without CUDA.

Not covered: megatron's uneven all-gather over the expert-tensor-parallel group (the
all-to-all dispatcher at expert-TP > 1 with sequence parallel) passes differently sized tensors
to ``all_gather``, which gloo refuses; on the CPU use expert-TP = 1 or the all-gather dispatcher.
"""

from __future__ import annotations

import contextlib
import logging

import torch

_RNG_WARNING = "CPU RNG state changed within GPU RNG context"
_applied = False


def _current_device() -> torch.device:
    return torch.device("cpu")


def _get_rng_state(*_args: object, **_kwargs: object) -> torch.Tensor:
    """Signature-compatible with torch.cuda.get_rng_state and megatron's _get_cuda_rng_state."""
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, *_args: object, **_kwargs: object) -> None:
    """Signature-compatible with torch.cuda.set_rng_state and megatron's _set_cuda_rng_state."""
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def _default_causal_mask(sq: int) -> torch.Tensor:
    """megatron.core.transformer.utils.get_default_causal_mask on the CPU: True = masked."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _synchronize(*_args: object, **_kwargs: object) -> None:
    """No device to wait for (megatron's p2p communication synchronises after batched sends)."""


class _CpuFactories:
    """``torch`` as megatron's pipeline schedules see it: ``torch.zeros(..., device="cuda")``
    (their token counters) builds on the CPU; everything else is the real module."""

    def __init__(self, module) -> None:
        self._torch = module

    def __getattr__(self, name: str):
        return getattr(self._torch, name)

    def zeros(self, *args, device=None, **kwargs):
        return self._torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


class _CpuEvent:
    def synchronize(self) -> None:
        """Host copies are complete when made."""


class _CpuStream:
    """The CPU's "stream": waiting on it or recording on it is a no-op. A class (not a factory
    function) because it replaces ``torch.cuda.Stream``, which libraries imported later use in
    annotations such as ``torch.cuda.Stream | None`` (transformers' generation utilities)."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def wait_stream(self, _stream: object) -> None:
        pass

    def record_event(self, _event: object = None) -> _CpuEvent:
        return _CpuEvent()


_CPU_STREAM = _CpuStream()


def _stream(*_args: object, **_kwargs: object) -> _CpuStream:
    return _CPU_STREAM


def _host_copy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's ``maybe_move_tensor_to_cpu`` for host tensors: numpy when asked (split sizes)."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def _fix_moe_without_te() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _DropSpuriousRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _RNG_WARNING


def apply_cpu_compat() -> bool:
    """Patch torch.cuda and megatron-core so megatron runs on CPU; see the module docstring.

    Idempotent. Returns True if the CPU patches are in effect after the call, False when CUDA
    is available (then only the Transformer-Engine-less MoE fix is applied).
    """
    global _applied
    _fix_moe_without_te()
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.current_device = _current_device
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = _manual_seed
    mp_random._get_cuda_rng_state = _get_rng_state
    mp_random._set_cuda_rng_state = _set_rng_state
    fused_softmax.get_default_causal_mask = _default_causal_mask
    torch.cuda.synchronize = _synchronize
    schedules.torch = _CpuFactories(torch)
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = _stream
    torch.cuda.stream = lambda _stream: contextlib.nullcontext()
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    logging.getLogger(mp_random.__name__).addFilter(_DropSpuriousRngWarning())
    _applied = True
    return True
