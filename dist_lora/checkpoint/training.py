"""Training checkpoints: one complete sharded checkpoint per step directory, and a ``latest``
pointer that moves only after the new checkpoint is complete.

    <root>/step_00000100/   adapter + optimizer state + RNG + trainer state (see sharded.py;
                            an FSDP2 run's DCP checkpoints, dcp_format.py, follow the same rules)
    <root>/latest           "step_00000100", rewritten atomically after each save
    <root>/superseded_<timestamp>/   checkpoints a resumed run moved out of its way

A crash (or ``kill -9`` of any rank) while a checkpoint is being written leaves the
previous one, and the pointer to it, untouched; the half-written directory is ignored.

A run owns the steps after the one it starts from: pruning (``keep_last``) only ever deletes
steps older than the checkpoint just written, and :func:`move_aside_later_checkpoints` moves
newer ones (an earlier run's future) into ``superseded_<timestamp>/``, never deleting them.
A ``latest`` pointer naming a missing or incomplete directory is an error, never a silent
fall-back to another checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..io import atomic_write_text
from ..parallel.collectives import raise_together
from .dcp_format import is_dcp_checkpoint, read_dcp_manifest
from .manifest import MANIFEST, read_manifest
from .sharded import apply_rng_states, load_sharded, read_rng_states, save_sharded

if TYPE_CHECKING:
    from ..model import LoraModel

LATEST = "latest"
SUPERSEDED_PREFIX = "superseded_"
_STEP_DIR = re.compile(r"step_(\d{8})")


def step_directory(root: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(root), f"step_{step:08d}")


def _step_of(path: str) -> int:
    return int(_STEP_DIR.fullmatch(os.path.basename(path)).group(1))


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def check_keep_last(keep_last: Optional[int]) -> None:
    """Refuse a ``keep_last`` that is not None or an integer >= 0."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0):
        raise ConfigError(f"keep_last must be None or an integer >= 0 (None or 0 keep every checkpoint), got {keep_last!r}.")


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: "LoraModel",
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainer_state: Optional[dict] = None,
    keep_last: Optional[int] = 2,
) -> str:
    """Save step ``step`` under ``root`` (every rank calls this); returns its directory.
    Keeps the ``keep_last`` newest complete checkpoints up to this one (None or 0 keeps all):
    only steps older than ``step`` are ever deleted, never the one just written nor newer ones."""
    check_keep_last(keep_last)
    path = step_directory(root, step)
    save_sharded(model, path, optimizer=optimizer, trainer_state={"step": step, **(trainer_state or {})})
    publish_checkpoint(root, step, keep_last)
    return path


def publish_checkpoint(root: str | os.PathLike, step: int, keep_last: Optional[int]) -> None:
    """After step ``step``'s checkpoint is complete under ``root`` (every rank calls this, any
    checkpoint format): rank 0 points ``latest`` at it and prunes to the ``keep_last`` newest
    (older steps only), then all ranks meet."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(os.path.join(os.fspath(root), LATEST), os.path.basename(step_directory(root, step)) + "\n")
        if keep_last:
            older = [d for d in complete_checkpoints(root) if _step_of(d) < step]
            for old in older[: max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(root: str | os.PathLike) -> list[str]:
    """Step directories under ``root`` that have a manifest, oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    steps = sorted(
        int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.fullmatch(name))
    )
    return [d for d in (step_directory(root, s) for s in steps) if _is_complete(d)]


def later_checkpoints(root: str | os.PathLike, step: int) -> list[str]:
    """Complete checkpoints under ``root`` of steps after ``step``, oldest first."""
    return [d for d in complete_checkpoints(root) if _step_of(d) > step]


def _pointer_target(root: str) -> Optional[str]:
    """The directory ``latest`` names (None without a pointer); refuses a name that is not a
    step directory of ``root``."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    if not _STEP_DIR.fullmatch(name):
        raise ConfigError(f"{pointer} must name a step directory like step_00000100, got {name[:80]!r}; "
                          "fix or remove the file.")
    return os.path.join(root, name)


def latest_checkpoint(root: str | os.PathLike) -> Optional[str]:
    """The checkpoint ``latest`` points to; without a pointer the newest complete one (None
    when there is none). A pointer to a missing or incomplete directory is a ConfigError."""
    root = os.fspath(root)
    target = _pointer_target(root)
    if target is None:
        complete = complete_checkpoints(root)
        return complete[-1] if complete else None
    if not _is_complete(target):
        state = "is incomplete (no manifest.json)" if os.path.isdir(target) else "does not exist"
        complete = complete_checkpoints(root)
        newest = f"the newest complete one is {complete[-1]}" if complete else "there is no complete checkpoint"
        raise ConfigError(
            f"{os.path.join(root, LATEST)} points to {target}, which {state}; {newest}. Pass a step directory "
            f"explicitly, or point {LATEST} at a complete one (or remove it to use the newest)."
        )
    return target


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A complete step directory: ``path`` itself, or the latest checkpoint of the root ``path``."""
    path = os.fspath(path)
    if _is_complete(path):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise ConfigError(f"no complete checkpoint in {path} (a step directory with {MANIFEST}, or a root holding them).")
    return found


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a complete checkpoint was saved at."""
    if is_dcp_checkpoint(path):
        return int(read_dcp_manifest(path, verify=False).get("trainer_state", {}).get("step", 0))
    return int(read_manifest(path, verify=False).get("trainer_state", {}).get("step", 0))


def move_aside_later_checkpoints(root: str | os.PathLike, step: int) -> Optional[str]:
    """Move the complete checkpoints of steps after ``step`` into a new
    ``<root>/superseded_<timestamp>/`` (with the ``latest`` pointer when it named one of them)
    and point ``latest`` at ``step`` when ``root`` holds it; returns the new directory (None
    when nothing was later). Call on one process only; nothing is deleted."""
    root = os.fspath(root)
    later = later_checkpoints(root, step)
    if not later:
        return None
    pointed = _pointer_target(root)  # a bad pointer raises before anything moves
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = os.path.join(root, SUPERSEDED_PREFIX + stamp), 1
    while os.path.exists(target):
        target, n = os.path.join(root, f"{SUPERSEDED_PREFIX}{stamp}-{n}"), n + 1
    os.makedirs(target)
    for path in later:
        os.rename(path, os.path.join(target, os.path.basename(path)))
    pointer, own = os.path.join(root, LATEST), step_directory(root, step)
    if pointed is not None and not _is_complete(pointed):  # it named a moved (or a missing) step
        os.rename(pointer, os.path.join(target, LATEST))
    if _is_complete(own):
        atomic_write_text(pointer, os.path.basename(own) + "\n")
    return target


def check_later_checkpoints(root: str | os.PathLike, step: int, refuse: bool = False) -> list[str]:
    """The complete checkpoints under ``root`` after ``step``, which a run starting at ``step``
    must not mix with; with ``refuse`` (``train.on_later_checkpoints=refuse``) having any is a
    ConfigError naming them. Read-only: call on every rank before any process group."""
    later = later_checkpoints(root, step)
    if later and refuse:
        names = ", ".join(os.path.basename(d) for d in later)
        raise ConfigError(
            f"{os.fspath(root)} has checkpoints after step {step} ({names}) from an earlier run; a run starting at "
            f"step {step} would mix with them. Resume from the newest (--resume), choose another train.out_dir, "
            f"or set train.on_later_checkpoints=move_aside to move them into {SUPERSEDED_PREFIX}<timestamp>/."
        )
    return later


def move_aside_together(root: str | os.PathLike, step: int) -> Optional[str]:
    """:func:`move_aside_later_checkpoints` on rank 0, called by every rank: each returns the
    same message (None when nothing was later), or raises the same ConfigError if the move
    failed, so no rank is left waiting. Only rank 0 looks at the directory: another rank's
    earlier look may predate the move."""
    outcome: list = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            moved = move_aside_later_checkpoints(root, step)
            outcome[0] = (True, moved and f"moved the checkpoints after step {step} into {moved}")
        except (ValueError, OSError) as e:
            outcome[0] = (False, f"could not move the checkpoints after step {step} in {os.fspath(root)} aside: {e}")
    if dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    ok, message = outcome[0]
    if not ok:
        raise ConfigError(message)
    return message


def load_checkpoint(
    path: str | os.PathLike, model: "LoraModel", optimizer: Optional[torch.optim.Optimizer] = None
) -> dict:
    """Load a training checkpoint (a step directory, or a root with a ``latest`` pointer);
    returns its trainer state (with ``step``). RNG states are restored when the layout is
    the same as when it was saved."""
    path = resolve_checkpoint(path)
    error, rng = None, None
    try:  # every file is checked before the model changes, and every rank learns of a bad one
        rng = read_rng_states(path)
    except ConfigError as e:
        error = e
    raise_together(error)
    state = load_sharded(model, path, optimizer=optimizer)
    state["rng_restored"] = apply_rng_states(rng)
    state["path"] = path
    return state
