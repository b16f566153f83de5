"""Training-run faults: a resumed run owns its future checkpoints, pruning never deletes the
checkpoint just written, a dangling ``latest`` pointer is an error, a non-finite loss or
gradient norm stops (or skips, counted) on every rank, and bad train-config values are refused
with the key named, before any process group.

Jobs run `train()` inside the forked test harness (real megatron-core, CPU gloo, the built-in
tiny model); a NaN gradient is injected on one rank only, to check that all ranks decide alike.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dist_lora.checkpoint.training import LATEST, latest_checkpoint, save_checkpoint
from dist_lora.config import ConfigError
from dist_lora.train import prepare, train
from dist_lora.train_health import NonFiniteTrainingError
from dist_lora.train_config import RULES, TrainConfig, load_train_config
from tests.harness import DistributedError, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "cpu_small.yaml")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> None:
    """The built-in tiny model goes to a per-module cache (created once)."""
    os.environ["DIST_LORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def _train(out: str, *overrides: str, resume: str | None = None) -> dict | str:
    """One rank of a job on the small config; a NonFiniteTrainingError comes back as its text,
    so that the test sees what every rank said."""
    config = load_train_config(SMALL, (f"train.out_dir={out}", *overrides))
    try:
        return train(config, resume=resume)
    except NonFiniteTrainingError as e:
        return f"NonFiniteTrainingError: {e}"


def _manifest(step_dir: str) -> dict:
    with open(os.path.join(step_dir, "manifest.json")) as f:
        return json.load(f)


# --- item 1: a resumed run owns its future -----------------------------------------------


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> str:
    """8 steps, a checkpoint every 2, all kept: steps 2, 4, 6, 8."""
    out = str(tmp_path_factory.mktemp("old") / "run")
    run_distributed(_train, 2, tp=2, args=(out, "train.checkpoint_interval=2", "train.keep_last=0"))
    return out


def _copy(old_run: str, tmp_path) -> tuple[str, str]:
    out = str(tmp_path / "run")
    shutil.copytree(old_run, out)
    return out, os.path.join(out, "checkpoints")


def test_resume_from_an_older_step_moves_the_later_ones_aside(old_run, tmp_path) -> None:
    out, root = _copy(old_run, tmp_path)
    summary = run_distributed(
        _train, 2, tp=2, args=(out, "train.keep_last=2", "train.steps=4", "train.checkpoint_interval=2"),
        kwargs={"resume": os.path.join(root, "step_00000002")},
    )[0]
    new = os.path.join(root, "step_00000004")
    assert summary["checkpoint"] == new and latest_checkpoint(root) == new
    assert _manifest(new)["trainer_state"]["config"]["train"]["steps"] == 4, "step 4 is not the new run's"
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_00000002", "step_00000004"]
    (superseded,) = glob.glob(os.path.join(root, "superseded_*"))
    moved = sorted(d for d in os.listdir(superseded) if d.startswith("step_"))
    assert moved == ["step_00000004", "step_00000006", "step_00000008"]
    assert all(os.path.isfile(os.path.join(superseded, d, "manifest.json")) for d in moved)
    assert _manifest(os.path.join(superseded, "step_00000008"))["trainer_state"]["config"]["train"]["steps"] == 8
    assert latest_checkpoint(superseded) == os.path.join(superseded, "step_00000008")  # a root of its own


def _train_with_a_late_rank(out: str, resume: str) -> dict:
    """Rank 1 reaches train() after rank 0 has had time to move the later checkpoints aside."""
    import time

    if torch.distributed.get_rank() == 1:
        time.sleep(3)
    return _train(out, "train.steps=4", "train.checkpoint_interval=2", resume=resume)


def test_moving_aside_does_not_depend_on_which_rank_looks_first(old_run, tmp_path) -> None:
    """Every rank joins the move (rank 0 decides), so a rank that looks at the directory after
    the move does not skip the collective and leave rank 0 waiting."""
    out, root = _copy(old_run, tmp_path)
    summary = run_distributed(_train_with_a_late_rank, 2, tp=2, args=(out, os.path.join(root, "step_00000002")))[0]
    assert summary["checkpoint"] == os.path.join(root, "step_00000004")
    assert len(glob.glob(os.path.join(root, "superseded_*"))) == 1


def test_later_checkpoints_are_refused_when_told(old_run, tmp_path) -> None:
    out, root = _copy(old_run, tmp_path)
    before = sorted(os.listdir(root))
    for resume, start, names in [
        (os.path.join(root, "step_00000002"), 2, "step_00000004, step_00000006, step_00000008"),
        (None, 0, "step_00000002, step_00000004, step_00000006, step_00000008"),  # a fresh run
    ]:
        with pytest.raises(DistributedError, match=rf"has checkpoints after step {start} \({names}\) from an earlier run"):
            run_distributed(_train, 2, tp=2, args=(out, "train.on_later_checkpoints=refuse"), kwargs={"resume": resume})
    assert sorted(os.listdir(root)) == before


def test_a_dangling_latest_pointer_is_an_error(tmp_path) -> None:
    for step in (2, 4):
        os.makedirs(tmp_path / f"step_0000000{step}")
        (tmp_path / f"step_0000000{step}" / "manifest.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "step_00000004")  # no pointer: the newest
    (tmp_path / LATEST).write_text("step_00000006\n")
    with pytest.raises(ConfigError, match=r"latest points to .*step_00000006, which does not exist; the newest complete one is .*step_00000004"):
        latest_checkpoint(tmp_path)
    os.makedirs(tmp_path / "step_00000006")
    with pytest.raises(ConfigError, match="step_00000006, which is incomplete"):
        latest_checkpoint(tmp_path)
    (tmp_path / LATEST).write_text("../../elsewhere\n")
    with pytest.raises(ConfigError, match="must name a step directory"):
        latest_checkpoint(tmp_path)


def _save_among_others(root: str) -> list[str]:
    from dist_lora import LoraConfig, get_lora_model
    from tests.models import build_tiny_gpt, tiny_gpt_config

    for step in (1, 2, 6, 8):  # older and newer checkpoints of another run
        os.makedirs(os.path.join(root, f"step_0000000{step}"))
        with open(os.path.join(root, f"step_0000000{step}", "manifest.json"), "w") as f:
            f.write("{}")
    model = get_lora_model(build_tiny_gpt(tiny_gpt_config(1, False)), LoraConfig(r=2), seed=0)
    save_checkpoint(root, 4, model, keep_last=2)
    return sorted(os.listdir(root))


def test_pruning_keeps_the_checkpoint_just_written(tmp_path) -> None:
    """keep_last=2 at step 4: steps 2 and 4 stay, step 1 goes; 6 and 8 are not its to prune."""
    left = run_distributed(_save_among_others, 1, args=(str(tmp_path),))[0]
    assert left == [LATEST, "step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    assert os.path.isfile(tmp_path / "step_00000004" / "manifest.json")


# --- item 2: keep_last=-1 -------------------------------------------------------------------


def test_negative_keep_last_is_refused_before_anything_is_written(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"train.keep_last must be an integer >= 0 \(0 keeps every checkpoint\), got -1"):
        load_train_config(SMALL, ("train.keep_last=-1",))
    with pytest.raises(ConfigError, match="keep_last must be None or an integer >= 0"):
        save_checkpoint(tmp_path / "ckpt", 2, model=None, keep_last=-1)
    assert not (tmp_path / "ckpt").exists()


# --- item 5: non-finite loss or gradient norm ----------------------------------------------


def _with_nan_gradient(step: int, out: str, *overrides: str) -> dict | str:
    """Train with one rank's first trainable gradient set to NaN at ``step`` (0-based)."""
    import dist_lora.train as job

    real, calls = job.finalize_lora_grads, []

    def poisoned(model, *args, **kwargs):
        if len(calls) == step and dist.get_rank() == 1:
            next(p for p in model.parameters() if p.requires_grad).grad.fill_(math.nan)
        calls.append(step)
        return real(model, *args, **kwargs)

    job.finalize_lora_grads = poisoned  # the name the training loop calls
    return _train(out, *overrides)


def _adapter_is_finite(step_dir: str) -> bool:
    shards = glob.glob(os.path.join(step_dir, "shard-*.safetensors"))
    return bool(shards) and all(torch.isfinite(t).all() for f in shards for t in load_file(f).values())


def test_divergence_stops_every_rank_keeping_the_last_good_checkpoint(tmp_path) -> None:
    out = str(tmp_path / "run")
    said = run_distributed(_train, 2, tp=2, args=(out, "optim.lr=1.0e+30", "train.checkpoint_interval=1", "train.consolidate=true"))
    assert said[0] == said[1] and said[0].startswith("NonFiniteTrainingError: step 2: the loss (nan)"), said
    assert "train.on_nonfinite=stop" in said[0] and "last good checkpoint is " + os.path.join(out, "checkpoints", "step_00000001") in said[0]
    assert latest_checkpoint(os.path.join(out, "checkpoints")) == os.path.join(out, "checkpoints", "step_00000001")
    assert not os.path.exists(os.path.join(out, "adapter"))


def test_divergence_under_torchrun_fails_with_one_line_per_rank(tmp_path) -> None:
    """The CLI exits non-zero, every rank prints the error as one line, nothing is released."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dist_lora.cli",
         "train", "--config", SMALL, f"train.out_dir={out}", "optim.lr=1.0e+30", "train.consolidate=true"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.count("dist-lora train: error: step 2: the loss (nan)") == 2, result.stderr[-3000:]
    assert "NonFiniteTrainingError" not in result.stderr, "a rank printed a traceback"  # torchrun's own is expected
    assert not (out / "adapter").exists()


def test_nan_gradient_on_one_rank_stops_all(tmp_path) -> None:
    out = str(tmp_path / "run")
    said = run_distributed(_with_nan_gradient, 2, tp=2, args=(4, out, "train.checkpoint_interval=2", "train.consolidate=true"))
    assert said[0] == said[1] and "step 5: the loss (" in said[0] and "gradient norm (nan) is not finite" in said[0], said
    step4 = os.path.join(out, "checkpoints", "step_00000004")
    assert latest_checkpoint(os.path.join(out, "checkpoints")) == step4 and _adapter_is_finite(step4)
    assert not os.path.exists(os.path.join(out, "adapter"))


def test_skip_mode_skips_and_counts_the_bad_step(tmp_path) -> None:
    out = str(tmp_path / "run")
    summaries = run_distributed(_with_nan_gradient, 2, tp=2, args=(4, out, "train.on_nonfinite=skip"))
    for summary in summaries:
        assert summary["skipped_steps"] == [4]
        assert sorted(summary["losses"]) == [0, 1, 2, 3, 5, 6, 7]
        assert all(math.isfinite(v) for v in summary["losses"].values())
    assert _adapter_is_finite(summaries[0]["checkpoint"])
    assert _manifest(summaries[0]["checkpoint"])["trainer_state"]["skipped_steps"] == [4]


def test_skip_mode_stops_after_too_many_in_a_row(tmp_path) -> None:
    out = str(tmp_path / "run")
    said = run_distributed(_train, 2, tp=2, args=(out, "optim.lr=1.0e+30", "train.on_nonfinite=skip", "train.max_skipped_in_a_row=2"))
    assert said[0] == said[1] and said[0].startswith("NonFiniteTrainingError: step 3:"), said
    assert "2 steps in a row, train.max_skipped_in_a_row=2" in said[0]


# --- item 9 and the train-config errors ----------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("lora=5", "config section lora must be a mapping"),
        ("train.out_dir=123", "train.out_dir must be a non-empty string, got 123"),
        ("optim.betas=[0.9]", r"optim.betas must be a list of two numbers in \[0, 1\)"),
        ("optim.grad_clip=abc", "optim.grad_clip must be a finite number > 0 or null"),
        ("train.eval_batches=0", "train.eval_batches must be >= 1 when evaluation is on"),
        ("optim.lr=-0.1", "optim.lr must be a finite number >= 0, got -0.1"),
        ("optim.lr=.inf", "optim.lr must be a finite number >= 0, got inf"),
        ("parallel.sp='true'", "parallel.sp must be true or false, got 'true'"),
        ("train.consolidate=nope", "train.consolidate must be true or false, got 'nope'"),
        ("train.steps=0", "train.steps must be an integer >= 1"),
        ("optim.warmup_steps=2.5", "optim.warmup_steps must be an integer >= 0"),
        ("optim.min_lr_ratio=2", r"optim.min_lr_ratio must be a finite number in \[0, 1\]"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite must be one of stop, skip"),
        ("data.eval_fraction=0", "evaluation needs held-out data"),
    ],
)
def test_bad_train_config_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_train_config(SMALL, (override,))


def test_eval_fraction_that_leaves_no_training_data_is_refused() -> None:
    with pytest.raises(ConfigError, match="data.eval_fraction=0.999 holds out all .* leaving none for training"):
        prepare(load_train_config(SMALL, ("data.eval_fraction=0.999",)), 2)
    assert not dist.is_initialized()


def test_every_train_key_has_one_rule_and_the_defaults_pass() -> None:
    config = TrainConfig()
    keys = {f"{s}.{f.name}" for s in ("model", "parallel", "data", "optim", "train")
            for f in dataclasses.fields(getattr(config, s))}
    assert keys == set(RULES)
    config.validate()
    for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")) + glob.glob(os.path.join(ROOT, "dist_lora", "configs", "*.yaml")):
        load_train_config(path)


def test_yaml_exponent_text_is_a_number() -> None:
    """YAML 1.1 reads 3e-4 as a string; a float key takes it as the number it spells."""
    assert load_train_config(SMALL, ("optim.lr=3e-4",)).optim.lr == 3e-4
    assert load_train_config(SMALL, ("optim.betas=[0.9, 1e-3]",)).optim.betas == [0.9, 1e-3]


def test_train_help_lists_every_config_key(capsys) -> None:
    from dist_lora.cli import main as cli_main
    from dist_lora.train_config import RULES

    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {key}=" in out for key in RULES), [key for key in RULES if f"  {key}=" not in out]
