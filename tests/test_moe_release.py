"""Release of megatron expert and router LoRA as PEFT ``target_parameters`` (transformers 5 MoE).

A tiny megatron Mixtral (EP=2; TP=2 with SP and expert-TP=2) and Qwen3-MoE (TP=2 with SP, EP=2,
shared expert adapters) take
one ``dist-lora train`` step with random non-zero factors on attention, every expert's fc1/fc2
and the router; ``dist-lora consolidate --hf-model`` writes the adapter, and the REAL
``peft.PeftModel.from_pretrained`` on the transformers model gives megatron's logits (1e-4,
fp32), with every expert receiving tokens. Zeroing the router's lora_B changes the logits (PEFT
applies the ``mlp.gate.weight`` adapter). The same file with lora_B stacked expert-major (the
wrong order) does not. ``--for vllm|sglang`` is refused (the engines' MoE LoRA rules are their
own); ``dist-lora merge`` writes the merged transformers model (per-expert and fused base
layouts) with megatron's logits. Refused: experts of one projection with different ranks, experts
missing, no HF model directory.
"""

from __future__ import annotations

import json
import os
import shutil

from typing import Optional

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dist_lora.cli import main as cli_main
from dist_lora.release.consolidate import consolidate
from dist_lora.release.errors import ConsolidationError
from dist_lora.release.experts import target_parameter_plan
from dist_lora.release.sources import Source
from dist_lora.train import train
from dist_lora.train_config import load_train_config
from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE_EXPERTS = os.path.join(ROOT, "configs", "moe_experts.yaml")
TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> None:
    os.environ["DIST_LORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def _train(out: str, *overrides: str) -> str:
    config = load_train_config(MOE_EXPERTS, (f"train.out_dir={out}", "train.steps=1", "train.eval_interval=0",
                                             "lora.init_lora_weights=false", *overrides))
    return train(config)["hf_dir"]


PER_EXPERT = {  # the per-expert checkpoint names: experts module, (gate, up, down), router module
    "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2"), "block_sparse_moe.gate"),
    "qwen3_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
}


def _write_per_expert_layout(src: str, dst: str, experts: str, parts: tuple, router: str) -> None:
    """A fused (transformers 5) checkpoint rewritten per expert, as save_pretrained writes one."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    out = {}
    for key, value in load_file(os.path.join(src, "model.safetensors")).items():
        layer = key.split(".mlp.")[0]
        if key.endswith("mlp.experts.gate_up_proj"):
            gate, up = value.chunk(2, dim=1)
            for e in range(value.shape[0]):
                out[f"{layer}.{experts}.{e}.{parts[0]}.weight"] = gate[e].contiguous()
                out[f"{layer}.{experts}.{e}.{parts[1]}.weight"] = up[e].contiguous()
        elif key.endswith("mlp.experts.down_proj"):
            for e in range(value.shape[0]):
                out[f"{layer}.{experts}.{e}.{parts[2]}.weight"] = value[e].contiguous()
        else:
            out[key.replace(".mlp.gate.", f".{router}.")] = value
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def _peft_logits(hf_dir: str, adapter: str, tokens: torch.Tensor) -> tuple[torch.Tensor, set]:
    """PEFT's logits and the experts (layer, e) that received tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), adapter).eval()
    used = set()
    hooks = [
        layer.mlp.experts.register_forward_hook(
            lambda module, args, output, i=i: used.update((i, int(e)) for e in args[1].unique()))
        for i, layer in enumerate(model.base_model.model.model.layers)
    ]
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    for hook in hooks:
        hook.remove()
    return logits, used


CASES = {
    "mixtral_ep2": ("mixtral", dict(ep=2, etp=1), ("parallel.ep=2",)),
    "mixtral_tp2_sp_expert_tp2": ("mixtral", dict(tp=2, ep=1, etp=2),
                                  ("parallel.tp=2", "parallel.sp=true", "parallel.ep=1", "parallel.etp=2")),
    "qwen3_moe_tp2_sp_ep2_shared": ("qwen3_moe", dict(tp=2, ep=2, etp=1),
                                    ("parallel.tp=2", "parallel.sp=true", "parallel.ep=2",
                                     "lora.runtime_config={expert_adapters: shared}")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_lora_releases_to_real_peft_with_megatron_logits(tmp_path, case: str) -> None:
    builtin, layout, overrides = CASES[case]
    out = str(tmp_path / "run")
    hf_dir = run_distributed(_train, 2, **layout, args=(out, f"model.builtin={builtin}", *overrides))[0]
    adapter = str(tmp_path / "adapter")
    assert cli_main(["consolidate", os.path.join(out, "checkpoints"), adapter, "--hf-model", hf_dir,
                     "--no-progress"]) == 0
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["target_parameters"] == [f"model.layers.{i}.{p}" for i in range(2) for p in
                                           ("mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight")]
    assert all("self_attn" in m for m in config["target_modules"])
    probe = load_file(os.path.join(out, "probe_logits.safetensors"))
    logits, used = _peft_logits(hf_dir, adapter, probe["tokens"])
    assert used == {(i, e) for i in range(2) for e in range(4)}  # every expert of every layer gets tokens
    assert (logits - probe["logits"]).abs().max().item() < TOLERANCE

    # dist-lora merge: the merged transformers model, from the per-expert base layout and the fused one
    per_expert = str(tmp_path / "per_expert")  # the built-in models are stored fused
    _write_per_expert_layout(hf_dir, per_expert, *PER_EXPERT[builtin])
    for base in (hf_dir, per_expert):
        merged = str(tmp_path / f"merged_{os.path.basename(base)}")
        assert cli_main(["merge", os.path.join(out, "checkpoints"), "--hf-model", base, merged, "--no-progress"]) == 0
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(input_ids=probe["tokens"]).logits
        assert (got - probe["logits"]).abs().max().item() < TOLERANCE

    with pytest.raises(ConsolidationError, match=r"mixture-of-experts experts or routers; .*\(--hf-model"):
        consolidate(os.path.join(out, "checkpoints"), str(tmp_path / "no_hf"), show_progress=False)
    assert not os.path.exists(tmp_path / "no_hf")

    from dist_lora.release.inspect import inspect_adapter

    report = inspect_adapter(adapter, "vllm")
    assert report.target_parameters == config["target_parameters"] and len(report.problems) == 1
    assert "mixture-of-experts" in report.problems[0] and report.max_lora_rank is None
    # per-expert rank and scaling come from the config, not from the stacked r·E rows of A
    lora = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert set(report.parameter_ranks.values()) == {lora["r"]}
    assert set(report.parameter_scalings.values()) == {lora["lora_alpha"] / lora["r"]}
    assert all("experts" not in m and not m.endswith("mlp.gate") for m in report.ranks)

    # serving engines: refused (their MoE LoRA rules are their own), nothing written
    for engine, name in (("vllm", "vLLM"), ("sglang", "SGLang")):
        with pytest.raises(ConsolidationError, match=rf"{name} applies LoRA to mixture-of-experts layers .*dist-lora merge"):
            consolidate(os.path.join(out, "checkpoints"), str(tmp_path / engine), hf_model_dir=hf_dir, target=engine,
                        show_progress=False)
        assert not os.path.exists(tmp_path / engine)

    # PEFT applies the router's adapter (mlp.gate.weight): without it the logits differ
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    original = dict(tensors)
    for key in [k for k in tensors if ".mlp.gate.lora_B" in k]:
        tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
    no_router, _ = _peft_logits(hf_dir, adapter, probe["tokens"])
    assert (no_router - probe["logits"]).abs().max().item() > 100 * TOLERANCE
    save_file(original, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})

    # the wrong stacking of lora_B (expert-major, as lora_A) loads without error and is caught
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    for key in [k for k in tensors if "mlp.experts" in k and k.endswith("lora_B.weight")]:
        out_f, stacked = tensors[key].shape
        tensors[key] = tensors[key].reshape(out_f, stacked // 4, 4).transpose(1, 2).reshape(out_f, stacked).contiguous()
    save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
    wrong, _ = _peft_logits(hf_dir, adapter, probe["tokens"])
    assert (wrong - probe["logits"]).abs().max().item() > 100 * TOLERANCE


def _sources(ranks: dict[int, int], experts: int = 4) -> dict[str, Source]:
    out = {}
    for e, r in ranks.items():
        module = f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2"
        out[f"{module}.lora_A.weight"] = Source(f"{module}.lora_A.weight", (r, 8), torch.float32, [])
        out[f"{module}.lora_B.weight"] = Source(f"{module}.lora_B.weight", (16, r), torch.float32, [])
    return out


def test_non_uniform_or_missing_expert_adapters_are_refused() -> None:
    from dist_lora.bridges import QWEN3_MOE
    from dist_lora.config import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"local_experts.1.linear_fc2": 8})
    with pytest.raises(ConsolidationError, match=r"experts have ranks \[4, 8\].*same rank_pattern"):
        target_parameter_plan(_sources({0: 4, 1: 8, 2: 4, 3: 4}), config, QWEN3_MOE, 4, {})
    with pytest.raises(ConsolidationError, match=r"model.layers.0.mlp.experts.down_proj: .*missing or incomplete: \[3\]"):
        target_parameter_plan(_sources({0: 4, 1: 4, 2: 4}), LoraConfig(r=4, lora_alpha=8), QWEN3_MOE, 4, {})
    ambiguous = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"experts.linear_fc2": 16})  # the shared adapter's name
    with pytest.raises(ConsolidationError, match=r"expert-free name decoder.layers.0.mlp.experts.linear_fc2 alpha \[16\]"):
        target_parameter_plan(_sources({e: 4 for e in range(4)}), ambiguous, QWEN3_MOE, 4, {})
    plan = target_parameter_plan(_sources({e: 4 for e in range(4)}), LoraConfig(r=4, lora_alpha=8), QWEN3_MOE, 4, {})
    assert [out.name for _, outs in plan.groups for out in outs] == [
        "base_model.model.model.layers.0.mlp.experts.lora_A.weight",
        "base_model.model.model.layers.0.mlp.experts.lora_B.weight",
    ]
    assert [src.global_shape for src, _ in plan.groups] == [(16, 8), (16, 16)]


def _export_and_file(hf_dir: str, directory: str, tp: int) -> Optional[tuple[dict, dict]]:
    from dist_lora import LoraConfig, get_lora_model
    from dist_lora.bridges import build_megatron_gpt
    from dist_lora.checkpoint.sharded import save_sharded
    from dist_lora.export import adapter_tensors

    gpt = build_megatron_gpt(hf_dir, tp=tp, sequence_parallel=tp > 1, ep=2, etp=1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["linear_qkv", "linear_fc1", "linear_fc2", "router"],
                        init_lora_weights=False)
    lora = get_lora_model(gpt, config, seed=3)
    save_sharded(lora, os.path.join(directory, "ckpt"))
    memory = adapter_tensors(lora, naming="peft", for_engine="peft", hf_model_dir=hf_dir)
    if torch.distributed.get_rank() != 0:
        return None
    consolidate(os.path.join(directory, "ckpt"), os.path.join(directory, "file"), hf_model_dir=hf_dir, show_progress=False)
    return memory, load_file(os.path.join(directory, "file", "adapter_model.safetensors"))


@pytest.mark.parametrize("tp", [1, 2])
def test_in_memory_export_at_ep2_equals_the_file_release(tmp_path, tp: int) -> None:
    """dist_lora.export.adapter_tensors at EP=2 (TP=1, and TP=2 with SP) returns the consolidated
    file's tensors bit for bit, target-parameter (stacked expert, router) keys included."""
    from tests.hf_models import tiny_mixtral

    hf_dir = str(tmp_path / "hf")
    tiny_mixtral(seed=3).save_pretrained(hf_dir)
    memory, written = run_distributed(_export_and_file, 2, tp=tp, ep=2, etp=1, args=(hf_dir, str(tmp_path), tp))[0]
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight" in written
    assert memory.keys() == written.keys()
    for key, tensor in written.items():
        assert torch.equal(memory[key], tensor), key
