"""The training job's device, attention, recompute and throughput options on CPU: SDPA and
megatron attention give the same run, full recompute the same losses, ``summary.json`` has the
throughput figures, ``train.device=cuda`` without CUDA is refused before any process group, and
TransformerEngine layers are refused with what to do instead."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from dist_lora import ConfigError, LoraConfig, get_lora_model
from tests.harness import run_distributed
from dist_lora.train import train
from dist_lora.train_config import load_train_config
from tests.small_runs import ROOT, SMALL, builtin_model_cache, run_small  # noqa: F401 (fixture)


def _run(out: str, *overrides: str) -> dict:
    return run_small(out, "train.steps=4", *overrides)


def test_attention_and_recompute_choices_train_alike(tmp_path) -> None:
    runs = {
        name: run_distributed(_run, 2, tp=2, args=(str(tmp_path / name), *overrides))[0]
        for name, overrides in [
            ("sdpa", ("model.attention=sdpa",)),
            ("megatron", ("model.attention=megatron",)),
            ("full", ("model.attention=sdpa", "train.recompute=full")),
        ]
    }
    for step, loss in runs["sdpa"]["losses"].items():
        assert loss == pytest.approx(runs["megatron"]["losses"][step], rel=1e-5)
        assert loss == runs["full"]["losses"][step]  # recompute changes no number
    with open(runs["sdpa"]["summary"]) as f:
        summary = json.load(f)
    assert summary["tokens_per_s"] > 0 and summary["model_flops_per_token"] > 0
    assert summary["mfu"] is None and summary["peak_memory_gib"] is None  # CPU: no peak set, no device memory


def test_mfu_with_a_peak(tmp_path) -> None:
    summary = run_distributed(_run, 2, tp=2, args=(str(tmp_path / "run"), "train.peak_tflops=1.0"))[0]
    expected = summary["model_flops_per_token"] * summary["tokens_per_s"] / (1e12 * 2)
    assert summary["mfu"] == pytest.approx(expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_any_process_group(tmp_path) -> None:
    config = load_train_config(SMALL, (f"train.out_dir={tmp_path}", "train.device=cuda"))
    with pytest.raises(ConfigError, match="train.device is cuda but this machine has no usable CUDA device"):
        train(config)
    assert not torch.distributed.is_initialized()


def test_transformer_engine_layers_are_refused() -> None:
    """A stand-in class with TransformerEngine's name and module (TE itself cannot be installed here):
    the refusal is by class, before anything is wrapped."""
    te_linear = type("TELayerNormColumnParallelLinear", (nn.Module,), {"__module__": "megatron.core.extensions.transformer_engine"})
    model = nn.ModuleDict({"linear_qkv": te_linear(), "linear_proj": nn.Linear(4, 4)})
    with pytest.raises(ConfigError, match="TransformerEngine's TELayerNormColumnParallelLinear.*local spec"):
        get_lora_model(model, LoraConfig(r=2, target_modules=["linear_qkv", "linear_proj"]))
    assert isinstance(model["linear_proj"], nn.Linear)


def test_gpu_check_script_runs_its_steps_on_cpu(tmp_path) -> None:
    """launch/gpu_check.py's steps (model, dist-lora train with recompute none/full and fsdp2, PEFT
    baseline, logits check, gpu_check.json) on a tiny model on CPU: all but the GPU itself."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "gpu_check.py"), str(tmp_path), "--tiny",
                             "--device", "cpu", "--dtype", "fp32"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(tmp_path / "gpu_check.json") as f:
        report = json.load(f)
    assert set(report["dist_lora"]) == {"none", "full"} and report["peft"]["tokens_per_s"] > 0
    assert report["logits"]["ok"] and "dist_lora / PEFT tokens/s" in result.stdout
    assert "error" not in report["dist_lora_fsdp2"] and report["dist_lora_fsdp2"]["tokens_per_s"] > 0
    assert "dist_lora fsdp2 (HF model)" in result.stdout
