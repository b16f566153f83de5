"""Make DeepSpeed start quickly and quietly, on CPU as on GPU.

Call :func:`prepare_deepspeed` before ``deepspeed.init_distributed`` / ``deepspeed.initialize``.
Without CUDA it:

- sets ``DS_ACCELERATOR=cpu`` (DeepSpeed picks the CPU accelerator itself, with a warning);
- replaces ``deepspeed.comm.torch.build_shm_op`` by a function returning ``None``. DeepSpeed's
  CPU backend otherwise JIT-compiles a shared-memory all-reduce kernel on the first
  ``init_distributed`` (30-45 s here); with ``None`` it uses gloo collectives, which is what
  the tests and the CPU configs want. The module is fetched with importlib because
  ``import deepspeed.comm.torch`` binds the name ``torch`` (the real torch), not the module.

It never touches a machine with CUDA: there the fused ops are the point.
"""

from __future__ import annotations

import importlib
import os

import torch


def prepare_deepspeed() -> None:
    """Idempotent; a no-op when CUDA is available."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    comm = importlib.import_module("deepspeed.comm.torch")
    comm.build_shm_op = _no_shm_op


def _no_shm_op() -> None:
    return None
