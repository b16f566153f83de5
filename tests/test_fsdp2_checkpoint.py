"""DCP checkpoints of FSDP2 LoRA runs: resume at other world sizes, atomic under kill -9, refusals."""

from __future__ import annotations

import os
import signal

import pytest

from dist_lora.checkpoint.training import LATEST, complete_checkpoints
from tests import fsdp_runs
from tests.harness import DistributedError, run_distributed

STEPS = 6


@pytest.fixture(scope="module")
def uninterrupted():
    return [loss for loss, _ in fsdp_runs.reference_run(STEPS)[0]]


def test_resume_at_other_world_sizes(tmp_path, uninterrupted):
    """DP=2 for 2 steps, resumed at DP=1 for 2, then at DP=4 for 2: the uninterrupted losses;
    keep_last=2 leaves the two newest checkpoints and latest names the newest."""
    root = str(tmp_path / "ckpt")
    losses = run_distributed(fsdp_runs.resumed_run, 2, args=(root, 0, 2))[0]
    losses += run_distributed(fsdp_runs.resumed_run, 1, args=(root, 2, 4))[0]
    losses += run_distributed(fsdp_runs.resumed_run, 4, args=(root, 4, 6))[0]
    assert losses == pytest.approx(uninterrupted, abs=1e-5)
    assert [os.path.basename(p) for p in complete_checkpoints(root)] == ["step_00000005", "step_00000006"]
    assert open(os.path.join(root, LATEST)).read().strip() == "step_00000006"
    manifest_files = sorted(os.listdir(os.path.join(root, "step_00000006")))
    assert "adapter_config.json" in manifest_files and "manifest.json" in manifest_files


def _killed_mid_save(root):
    """Rank 1 SIGKILLs itself after writing its DCP data for step 2, before the save completes."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        result = original(self, plan, planner)
        if dist.get_rank() == 1 and os.path.basename(str(self.path)).startswith(".step_00000002"):
            result.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    FileSystemWriter.write_data = write_then_die
    fsdp_runs.resumed_run(root, 0, 2)


def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path, uninterrupted):
    root = str(tmp_path / "ckpt")
    with pytest.raises(DistributedError, match="exited with code -9"):
        run_distributed(_killed_mid_save, 2, timeout=60, args=(root,))
    assert [os.path.basename(p) for p in complete_checkpoints(root)] == ["step_00000001"]
    assert open(os.path.join(root, LATEST)).read().strip() == "step_00000001"
    assert os.path.isdir(os.path.join(root, ".step_00000002.partial"))  # the interrupted save, ignored
    losses = run_distributed(fsdp_runs.resumed_run, 2, args=(root, 1, 3))[0]
    assert losses == pytest.approx(uninterrupted[1:3], abs=1e-5)
    assert not os.path.exists(os.path.join(root, ".step_00000002.partial"))  # reused, then renamed


def _load_into(root, config=None, **model_overrides):
    from dist_lora.fsdp import shard_lora_model
    from dist_lora.fsdp.checkpoint import load_fsdp_checkpoint

    model = shard_lora_model(fsdp_runs.build(config, **model_overrides))
    before = fsdp_runs.adapter(model)
    try:
        load_fsdp_checkpoint(root, model, fsdp_runs.make_optimizer(model))
    except ValueError as e:
        after = fsdp_runs.adapter(model)
        return str(e), all((after[k] == before[k]).all() for k in before)
    return None, None


def test_refuses_checkpoint_of_another_config_or_model(tmp_path):
    root = str(tmp_path / "ckpt")
    run_distributed(fsdp_runs.resumed_run, 2, args=(root, 0, 1))
    message, unchanged = run_distributed(_load_into, 2, args=(root, fsdp_runs.lora_config(r=8)))[0]
    assert "another adapter config: r=4 there, 8 here" in message and unchanged
    message, unchanged = run_distributed(_load_into, 2, args=(root,), kwargs=dict(intermediate_size=48))[0]
    assert "another base model: intermediate_size=64 there, 48 here" in message and unchanged


def test_async_save_holds_the_state_of_its_step(tmp_path, uninterrupted):
    """The parameters change while the asynchronous save writes; resuming from it still
    reproduces the uninterrupted run."""
    root = str(tmp_path / "ckpt")
    losses = run_distributed(fsdp_runs.async_saved_run, 2, args=(root,))[0]
    assert losses == pytest.approx(uninterrupted[:3], abs=1e-5)
    assert open(os.path.join(root, LATEST)).read().strip() == "step_00000001"
    resumed = run_distributed(fsdp_runs.resumed_run, 2, args=(root, 1, 3))[0]
    assert resumed == pytest.approx(uninterrupted[1:3], abs=1e-5)
