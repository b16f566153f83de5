"""Whether a training step may be taken: its loss and gradient norm, agreed by every rank.

A non-finite value stops the run (``train.on_nonfinite=stop``: NonFiniteTrainingError on every
rank, the last good checkpoint kept, nothing released) or skips that optimizer step (``skip``:
counted, and the run stops after ``train.max_skipped_in_a_row`` in a row)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .checkpoint.training import complete_checkpoints
from .train_config import TrainSection
from .train_report import log


class NonFiniteTrainingError(ValueError):
    """The loss or the gradient norm of a step was not finite (``train.on_nonfinite``). A
    ValueError so that the CLI reports it as one line on every rank."""


def agree_on_step(loss: float, grad_norm: float, device: torch.device = torch.device("cpu")) -> tuple[float, bool]:
    """The step's loss (mean over data-parallel replicas) and whether it and the gradient norm
    are finite on every rank: one all-reduce over the world, so that every TP/PP/DP rank takes
    the same decision. ``loss`` is this replica's loss (the same on its TP/PP ranks)."""
    ok = math.isfinite(loss) and math.isfinite(grad_norm)
    stats = torch.tensor([loss, 0.0 if ok else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    return stats[0].item() / dist.get_world_size(), stats[1].item() == 0


def in_a_row(skipped: list[int], step: int) -> int:
    """How many steps up to ``step`` were skipped without a good step between."""
    marked, count = set(skipped), 0
    while step - count in marked:
        count += 1
    return count


def handle_nonfinite(step: int, loss: float, grad_norm: float, skipped: list[int], t: TrainSection, ckpt_root: str) -> None:
    """Under ``train.on_nonfinite=skip`` log the skipped step; raise NonFiniteTrainingError
    (on every rank, before any adapter is released) under ``stop`` or after
    ``train.max_skipped_in_a_row`` skips in a row. The optimizer step was not taken."""
    row = in_a_row(skipped, step)
    what = f"step {step + 1}: the loss ({loss:.4g}) or the gradient norm ({grad_norm:.4g}) is not finite"
    if t.on_nonfinite == "skip" and row < t.max_skipped_in_a_row:
        log(f"{what}; optimizer step skipped ({row} in a row, {len(skipped)} in all; "
            f"train.max_skipped_in_a_row={t.max_skipped_in_a_row})")
        return
    if t.on_nonfinite == "stop":
        why, advice = "train.on_nonfinite=stop", "or set train.on_nonfinite=skip"
    else:
        why = f"{row} steps in a row, train.max_skipped_in_a_row={t.max_skipped_in_a_row}"
        advice = "or raise train.max_skipped_in_a_row"
    kept = complete_checkpoints(ckpt_root)
    raise NonFiniteTrainingError(
        f"{what} ({why}): training stopped without taking that step and no adapter was released; the last good "
        f"checkpoint is {kept[-1] if kept else 'none (none was written yet)'}. Lower optim.lr, set optim.grad_clip, "
        f"check the data {advice}; then resume with --resume."
    )
