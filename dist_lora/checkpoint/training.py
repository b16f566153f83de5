"""Training checkpoints: one complete sharded checkpoint per step directory, and a ``latest``
pointer that moves only after the new checkpoint is complete.

    <root>/step_00000100/   adapter + optimizer state + RNG + trainer state (see sharded.py)
    <root>/latest           "step_00000100", rewritten atomically after each save

A crash (or ``kill -9`` of any rank) while a checkpoint is being written leaves the
previous one, and the pointer to it, untouched; the half-written directory is ignored.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..io import atomic_write_text
from .sharded import MANIFEST, load_sharded, restore_rng_states, save_sharded

if TYPE_CHECKING:
    from ..model import LoraModel

LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d{8})")


def step_directory(root: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(root), f"step_{step:08d}")


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: "LoraModel",
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainer_state: Optional[dict] = None,
    keep_last: Optional[int] = 2,
) -> str:
    """Save step ``step`` under ``root`` (every rank calls this); returns its directory.
    Keeps the ``keep_last`` newest complete checkpoints (None keeps all)."""
    path = step_directory(root, step)
    save_sharded(model, path, optimizer=optimizer, trainer_state={"step": step, **(trainer_state or {})})
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(os.path.join(os.fspath(root), LATEST), os.path.basename(path) + "\n")
        if keep_last:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def complete_checkpoints(root: str | os.PathLike) -> list[str]:
    """Step directories under ``root`` that have a manifest, oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    steps = sorted(
        int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.fullmatch(name))
    )
    return [d for d in (step_directory(root, s) for s in steps) if os.path.isfile(os.path.join(d, MANIFEST))]


def latest_checkpoint(root: str | os.PathLike) -> Optional[str]:
    """The checkpoint ``latest`` points to (or, without a pointer, the newest complete one)."""
    root = os.fspath(root)
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return path
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def load_checkpoint(
    path: str | os.PathLike, model: "LoraModel", optimizer: Optional[torch.optim.Optimizer] = None
) -> dict:
    """Load a training checkpoint (a step directory, or a root with a ``latest`` pointer);
    returns its trainer state (with ``step``). RNG states are restored when the layout is
    the same as when it was saved."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        found = latest_checkpoint(path)
        if found is None:
            raise ConfigError(f"no complete checkpoint in {path}.")
        path = found
    state = load_sharded(model, path, optimizer=optimizer)
    state["rng_restored"] = restore_rng_states(path)
    state["path"] = path
    return state
