"""A bf16 base with fp32 adapters, on CPU: layout invariance in bf16, closeness to fp32, the
fused tensor-parallel path (no extra collective) with adapters computing in bf16, fp32
checkpoints, and a released adapter that PEFT loads with the bf16 run's logits.

Tolerances: bf16 keeps 8 significand bits (relative rounding 2^-9 ≈ 0.2% per operation). The
adapters and their optimizer state are fp32, so bf16 only rounds the activations: losses of the
same bf16 run at two layouts differ by summation order (~1e-2 relative at most here); bf16 vs
fp32 losses differ by the accumulated activation rounding (a few 1e-2 relative over 20 steps of
a 2-layer model); megatron bf16 logits vs PEFT fp32 logits differ by about 1e-2 absolute."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from dist_lora import LoraConfig, get_lora_model
from dist_lora.parallel.comm_counter import CollectiveCounter
from dist_lora.parallel.grads import finalize_lora_grads
from tests import models
from tests.harness import run_distributed
from tests.small_runs import builtin_model_cache, run_small  # noqa: F401 (fixture)


def _run(out: str, *overrides: str) -> dict:
    return run_small(out, *overrides)


def test_bf16_layouts_agree_and_stay_close_to_fp32(tmp_path) -> None:
    steps = "train.steps=20"
    tp2 = run_distributed(_run, 2, tp=2, args=(str(tmp_path / "tp2"), steps, "model.dtype=bf16", "parallel.sp=true"))[0]
    tp1 = run_distributed(_run, 1, args=(str(tmp_path / "tp1"), steps, "model.dtype=bf16", "parallel.tp=1"))[0]
    fp32 = run_distributed(_run, 2, tp=2, args=(str(tmp_path / "fp32"), steps))[0]
    for step, loss in tp2["losses"].items():
        assert loss == pytest.approx(tp1["losses"][step], rel=1e-2)
        assert loss == pytest.approx(fp32["losses"][step], rel=3e-2)
    assert tp2["losses"][19] < tp2["losses"][0]
    shard = load_file(os.path.join(tp2["checkpoint"], "shard-pp000-tp000.safetensors"))
    assert {t.dtype for t in shard.values()} == {torch.float32}, "checkpoints keep fp32 adapters"
    with open(tp2["summary"]) as f:
        assert json.load(f)["losses"]


def test_released_bf16_adapter_gives_peft_the_run_logits(tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "run")
    summary = run_distributed(_run, 2, tp=2, args=(out, "train.steps=20", "model.dtype=bf16", "optim.lr=0.02",
                                                   "train.consolidate=true"))[0]
    probe = load_file(summary["probe"])
    base = AutoModelForCausalLM.from_pretrained(summary["hf_dir"], dtype=torch.float32)
    with torch.no_grad():
        without = base(input_ids=probe["tokens"]).logits
        model = PeftModel.from_pretrained(base, summary["adapter"]).eval()
        logits = model(input_ids=probe["tokens"]).logits
    diff, effect = (logits - probe["logits"]).abs().max().item(), (logits - without).abs().max().item()
    assert diff < 3e-2, diff
    assert effect > 5 * diff, (effect, diff)  # the check would notice a missing or wrong adapter

    from dist_lora.cli import main as cli_main

    half = str(tmp_path / "bf16_release")
    assert cli_main(["consolidate", summary["checkpoint"], half, "--hf-model", summary["hf_dir"], "--dtype", "bf16",
                     "--no-progress"]) == 0
    assert {t.dtype for t in load_file(os.path.join(half, "adapter_model.safetensors")).values()} == {torch.bfloat16}
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(summary["hf_dir"], dtype=torch.float32)
        half_logits = PeftModel.from_pretrained(base, half).eval()(input_ids=probe["tokens"]).logits
    assert (half_logits - logits).abs().max().item() < 3e-2  # only the factors' rounding to bf16


def _collectives(dtype: torch.dtype) -> dict:
    config = models.tiny_gpt_config(2, True, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    model = get_lora_model(models.build_tiny_gpt(config), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), seed=0)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with CollectiveCounter() as counter:
        models.gpt_loss(model, *models.random_batch(0)).backward()
        finalize_lora_grads(model)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    return dict(counter.counts)


def test_bf16_keeps_the_fused_path() -> None:
    """Adapters compute in the base's bf16 (cast from their fp32 masters), so the fused path and
    its collective count are the fp32 run's: no per-layer collective is added."""
    counts = {str(d): run_distributed(_collectives, 2, tp=2, args=(d,))[0] for d in (torch.float32, torch.bfloat16)}
    assert counts["torch.bfloat16"] == counts["torch.float32"], counts


def test_fp16_with_dynamic_loss_scaling(tmp_path) -> None:
    """fp16 tracks fp32; too large a scale overflows, the step is skipped and the scale backs off
    until steps are taken; a scale that collapses below its minimum stops the run on every rank
    with nothing released."""
    fp16 = run_distributed(_run, 2, tp=2, args=(str(tmp_path / "fp16"), "train.steps=8", "model.dtype=fp16"))[0]
    fp32 = run_distributed(_run, 2, tp=2, args=(str(tmp_path / "fp32"), "train.steps=8"))[0]
    assert fp16["fp16_overflow_steps"] == 0
    for step, loss in fp16["losses"].items():
        assert loss == pytest.approx(fp32["losses"][step], rel=1e-2)
    high = run_distributed(_run, 2, tp=2, args=(str(tmp_path / "high"), "train.steps=12", "model.dtype=fp16",
                                                "train.initial_loss_scale=1.0e+7"))[0]
    assert high["fp16_overflow_steps"] > 0 and len(high["losses"]) == 12 - high["fp16_overflow_steps"] > 0
    out = str(tmp_path / "collapse")
    with pytest.raises(Exception, match="the fp16 loss scale fell below its minimum"):
        run_distributed(_run, 2, tp=2, args=(out, "train.steps=8", "model.dtype=fp16", "train.initial_loss_scale=1.0e+30",
                                             "train.min_loss_scale=1.0e+28", "train.consolidate=true"))
    assert not os.path.exists(os.path.join(out, "adapter"))
