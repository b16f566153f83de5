"""Sharded checkpoints of MoE expert adapters record GLOBAL expert indices: a checkpoint saved
at EP = 2 loads at EP = 1, at EP = 4 and at expert-TP = 2 with the same adapters, and the
optimizer state reshards with them (one more AdamW step after loading matches the run that
saved)."""

from __future__ import annotations

import os

import torch

from dist_lora import LoraConfig, get_lora_model
from dist_lora.checkpoint.sharded import load_sharded, save_sharded
from dist_lora.config import ConfigError, LoraRuntimeConfig
from dist_lora.parallel.grads import allreduce_data_parallel_grads, finalize_lora_grads
from tests.harness import run_distributed
from tests.models import build_tiny_gpt, fill_weights_by_global_name, gpt_loss, moe_config, random_batch
from tests.test_moe_lora import gathered_adapters

TARGETS = ["linear_fc1", "linear_fc2", "linear_qkv"]


def _model(ep: int, tp_size: int, etp: int, dispatcher: str, seed: int, expert_adapters: str = "per_expert"):
    model = build_tiny_gpt(moe_config(tp_size, ep, etp, dispatcher))
    fill_weights_by_global_name(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                        runtime_config=LoraRuntimeConfig(expert_adapters=expert_adapters))
    lora = get_lora_model(model, config, seed=seed)
    return lora, torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)


def _step(lora, optimizer, step: int) -> None:
    loss = gpt_loss(lora, *random_batch(200 + step))
    optimizer.zero_grad()
    loss.backward()
    finalize_lora_grads(lora)
    allreduce_data_parallel_grads(lora)
    optimizer.step()


def _save(directory: str) -> dict:
    lora, optimizer = _model(2, 1, 1, "alltoall", seed=7)
    _step(lora, optimizer, 0)
    save_sharded(lora, directory, optimizer=optimizer)
    saved = gathered_adapters(lora, "value")
    _step(lora, optimizer, 1)
    return {"saved": saved, "next": gathered_adapters(lora, "value")}


def _load(directory: str, ep: int, tp_size: int, etp: int, dispatcher: str) -> dict:
    lora, optimizer = _model(ep, tp_size, etp, dispatcher, seed=8)  # another init: loading must replace it
    fresh = gathered_adapters(lora, "value")
    load_sharded(lora, directory, optimizer=optimizer)
    loaded = gathered_adapters(lora, "value")
    _step(lora, optimizer, 1)
    return {"fresh": fresh, "loaded": loaded, "next": gathered_adapters(lora, "value")}


def _close(got: dict, want: dict, tolerance: float) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        error = (got[key] - value).abs().max().item() / max(value.abs().max().item(), 1e-12)
        assert error < tolerance, f"{key}: relative error {error:.2e}"


def test_expert_checkpoint_saved_at_ep2_loads_at_ep1_ep4_and_expert_tp2(tmp_path) -> None:
    directory = str(tmp_path / "ckpt")
    saved = run_distributed(_save, 2, ep=2, etp=1, args=(directory,))[0]
    files = sorted(f for f in os.listdir(directory) if f.startswith("shard-"))
    assert files == ["shard-pp000-tp000-ep000.safetensors", "shard-pp000-tp000-ep001.safetensors",
                     "shard-pp000-tp000.safetensors"]
    assert sum(".local_experts.3." in k for k in saved["saved"]) == 2 * 2 * 2  # layers x (fc1, fc2) x (A, B)
    for ep, tp_size, etp, dispatcher in [(1, 1, 1, "alltoall"), (4, 1, 1, "alltoall"), (1, 2, 2, "allgather")]:
        got = run_distributed(_load, ep * max(tp_size, etp), tp=tp_size, ep=ep, etp=etp,
                              args=(directory, ep, tp_size, etp, dispatcher))[0]
        assert any(not torch.equal(got["fresh"][k], v) for k, v in saved["saved"].items()), "nothing to load"
        for key, value in saved["saved"].items():
            assert torch.equal(got["loaded"][key], value), f"{key} differs after loading at EP={ep}, TP={tp_size}"
        _close(got["next"], saved["next"], 1e-4)  # the optimizer state resharded too


def _load_into_shared(directory: str) -> str:
    lora, _ = _model(1, 1, 1, "alltoall", seed=8, expert_adapters="shared")
    before = gathered_adapters(lora, "value")
    try:
        load_sharded(lora, directory)
    except ConfigError as e:
        assert all(torch.equal(v, gathered_adapters(lora, "value")[k]) for k, v in before.items())
        return str(e)
    return ""


def test_per_expert_checkpoint_is_refused_by_a_shared_adapter_model(tmp_path) -> None:
    directory = str(tmp_path / "ckpt")
    run_distributed(_save, 2, ep=2, etp=1, args=(directory,))
    message = run_distributed(_load_into_shared, 1, args=(directory,))[0]
    assert "expert_adapters='per_expert'" in message
