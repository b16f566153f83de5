"""Training checkpoints: resuming reproduces the uninterrupted run's losses, also at another
TP size (adapter and AdamW state are resharded); a rank killed with SIGKILL in the middle of
writing a checkpoint leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from megatron.core import parallel_state

from dist_lora import LoraConfig, get_lora_model
from dist_lora.checkpoint import sharded
from dist_lora.checkpoint.training import latest_checkpoint, load_checkpoint, save_checkpoint
from dist_lora.parallel.grads import finalize_lora_grads
from tests.harness import DistributedError, run_distributed
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config

MODEL = dict(num_attention_heads=8, num_query_groups=4)
STEPS, SAVE_AT = 6, 3


def _train(root: str, stop: int, save_at: int | None = None, resume: bool = False, sp: bool = False) -> dict:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, sp, **MODEL)), LoraConfig(r=4, lora_alpha=8), seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = load_checkpoint(root, model, optimizer)["step"] if resume else 0
    losses = {}
    for step in range(start, stop):
        loss = gpt_loss(model, *random_batch(step))
        loss.backward()
        finalize_lora_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        losses[step] = loss.item()
        if save_at is not None and step + 1 == save_at:
            save_checkpoint(root, step + 1, model, optimizer)
    return losses


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("resume"))
    uninterrupted = run_distributed(_train, 2, tp=2, args=(str(root) + "/unused", STEPS))[0]
    run_distributed(_train, 2, tp=2, args=(root, SAVE_AT, SAVE_AT))
    return root, uninterrupted


@pytest.mark.parametrize("tp,sp", [(2, False), (4, True), (1, False)])
def test_resume_reproduces_losses(saved, tp: int, sp: bool) -> None:
    root, uninterrupted = saved
    resumed = run_distributed(_train, tp, tp=tp, args=(root, STEPS), kwargs={"resume": True, "sp": sp})[0]
    assert sorted(resumed) == list(range(SAVE_AT, STEPS))
    for step, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-5), f"step {step} at TP={tp}"


def _killed_while_saving(root: str) -> None:
    """Save step 2, then start saving step 4 and SIGKILL rank 1 half way through its file."""
    write_file = sharded._write_file

    def dying_write(staging, file_name, pieces):
        if parallel_state.get_tensor_model_parallel_rank() == 1 and "step_00000004" in staging:
            with open(os.path.join(staging, file_name), "wb") as f:
                f.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        return write_file(staging, file_name, pieces)

    sharded._write_file = dying_write
    _train(root, 2, save_at=2)
    _train(root, 4, save_at=4, resume=True)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path) -> None:
    root = str(tmp_path)
    with pytest.raises(DistributedError, match="rank 1"):
        run_distributed(_killed_while_saving, 2, tp=2, args=(root,), timeout=60)
    assert latest_checkpoint(root) == os.path.join(root, "step_00000002")
    assert not os.path.exists(os.path.join(root, "step_00000004", "manifest.json"))
    resumed = run_distributed(_train, 2, tp=2, args=(root, 3), kwargs={"resume": True})[0]
    reference = run_distributed(_train, 2, tp=2, args=(root + "/unused", 3))[0]
    assert resumed[2] == pytest.approx(reference[2], rel=1e-5)
