"""``dist-lora train`` on a mixture of experts (configs/moe_small.yaml: the built-in tiny Mixtral,
LoRA on attention): at EP=2 the losses equal EP=1's (also with a load-balancing loss), and the
consolidated adapter loads in the real PEFT onto the transformers Mixtral with the megatron
model's logits; the built-in Qwen3-MoE trains at EP=2 and resumes at EP=1. LoRA on the experts
and the router (configs/moe_experts.yaml) trains at EP=2 as at EP=1, per-expert and shared, and
counts a shared adapter once. Bad expert layouts are refused before any process group exists.
The torchrun launch of the command itself is the slow test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist_lora.config import ConfigError
from dist_lora.train import prepare, train
from dist_lora.train_config import load_train_config
from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE_SMALL = os.path.join(ROOT, "configs", "moe_small.yaml")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> None:
    """The built-in tiny models go to a per-session cache (created once)."""
    os.environ["DIST_LORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def _run(out: str, *overrides: str) -> dict:
    config = load_train_config(MOE_SMALL, (f"train.out_dir={out}", "train.steps=2", "train.eval_interval=0",
                                           *overrides))
    return train(config)["losses"]


def test_train_at_ep2_matches_ep1_and_releases_a_peft_adapter(tmp_path) -> None:
    from dist_lora.demo import verify
    from dist_lora.tiny_model import builtin_model_dir

    out = str(tmp_path / "ep2")
    ep2 = run_distributed(_run, 2, ep=2, etp=1, args=(out, "train.consolidate=true"))[0]
    ep1 = run_distributed(_run, 2, ep=1, etp=1, args=(str(tmp_path / "ep1"), "parallel.ep=1"))[0]
    assert sorted(ep2) == [0, 1]
    assert ep2 == pytest.approx(ep1, rel=1e-5)
    assert verify(out, builtin_model_dir(kind="mixtral")) == 0  # real PEFT on transformers' Mixtral


def test_expert_tensor_parallel_matches_whole_experts(tmp_path) -> None:
    """parallel.etp=2 (each expert split over the 2 TP ranks; the all-gather dispatcher on CPU)
    trains as etp=1 (whole experts, all-to-all dispatcher) at TP=2 with SP."""
    tp2 = ("parallel.tp=2", "parallel.sp=true", "parallel.ep=1")
    split = run_distributed(_run, 2, tp=2, ep=1, etp=2, args=(str(tmp_path / "etp2"), *tp2, "parallel.etp=2"))[0]
    whole = run_distributed(_run, 2, tp=2, ep=1, etp=1, args=(str(tmp_path / "etp1"), *tp2, "parallel.etp=1"))[0]
    assert split == pytest.approx(whole, rel=1e-5)


def test_qwen3_moe_trains_at_ep2_resumes_at_ep1_and_releases(tmp_path) -> None:
    """The built-in tiny Qwen3-MoE (q/k norms): 4 steps at EP=2 equal a run that stops at step 2
    and resumes at EP=1 (attention adapters do not depend on the expert layout), and the
    released adapter gives the megatron logits in PEFT on transformers' Qwen3-MoE."""
    from dist_lora.demo import verify
    from dist_lora.tiny_model import builtin_model_dir

    qwen = ("model.builtin=qwen3_moe", "train.steps=4", "train.checkpoint_interval=2")
    full = run_distributed(_run, 2, ep=2, etp=1, args=(str(tmp_path / "full"), *qwen, "train.consolidate=true"))[0]
    run_distributed(_run, 2, ep=2, etp=1, args=(str(tmp_path / "cut"), *qwen))
    resumed = run_distributed(
        _resume, 2, ep=1, etp=1, args=(str(tmp_path / "cut"), *qwen, "parallel.ep=1"),
    )[0]
    assert sorted(resumed) == [2, 3]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-5)
    assert verify(str(tmp_path / "full"), builtin_model_dir(kind="qwen3_moe")) == 0


MOE_EXPERTS = os.path.join(ROOT, "configs", "moe_experts.yaml")


def _run_experts(out: str, *overrides: str) -> dict:
    config = load_train_config(MOE_EXPERTS, (f"train.out_dir={out}", "train.steps=2", "train.eval_interval=0",
                                             *overrides))
    summary = train(config)
    return {"losses": summary["losses"], "trainable": summary["trainable_parameters"]}


def test_expert_and_router_lora_train_at_ep2_as_at_ep1(tmp_path) -> None:
    """configs/moe_experts.yaml (LoRA on attention, every expert's fc1/fc2 and the router):
    EP=2 losses = EP=1 losses, per-expert and shared; the trainable count does not depend on EP
    and a shared adapter is counted once (2 layers x (fc1 + fc2) instead of x 4 experts)."""
    got = {}
    for ep in (2, 1):
        for kind in ("per_expert", "shared"):
            args = (str(tmp_path / f"{kind}{ep}"), f"parallel.ep={ep}", f"lora.runtime_config={{expert_adapters: {kind}}}")
            got[ep, kind] = run_distributed(_run_experts, 2, ep=ep, etp=1, args=args)[0]
    for kind in ("per_expert", "shared"):
        assert got[2, kind]["losses"] == pytest.approx(got[1, kind]["losses"], rel=1e-5)
        assert got[2, kind]["trainable"] == got[1, kind]["trainable"]
    assert got[2, "per_expert"]["losses"][1] != pytest.approx(got[2, "shared"]["losses"][1], rel=1e-6)
    r, hidden, ffn, experts, layers = 4, 128, 128, 4, 2  # the built-in tiny Mixtral
    per_expert_fc = layers * experts * r * ((hidden + 2 * ffn) + (ffn + hidden))
    shared_fc = per_expert_fc // experts
    assert got[2, "per_expert"]["trainable"] - got[2, "shared"]["trainable"] == per_expert_fc - shared_fc


def _resume(out: str, *overrides: str) -> dict:
    config = load_train_config(MOE_SMALL, (f"train.out_dir={out}", "train.eval_interval=0", *overrides))
    return train(config, resume=os.path.join(out, "checkpoints", "step_00000002"))["losses"]


def test_load_balancing_loss_at_ep2_matches_ep1(tmp_path) -> None:
    """model.moe_aux_loss_coeff > 0 changes the training (its gradient reaches the attention
    adapters through the router's input) the same way at EP=2 as at EP=1."""
    aux = ("model.moe_aux_loss_coeff=0.5", "train.steps=3")
    ep2 = run_distributed(_run, 2, ep=2, etp=1, args=(str(tmp_path / "ep2"), *aux))[0]
    ep1 = run_distributed(_run, 2, ep=1, etp=1, args=(str(tmp_path / "ep1"), "parallel.ep=1", *aux))[0]
    plain = run_distributed(_run, 2, ep=2, etp=1, args=(str(tmp_path / "plain"), "train.steps=3"))[0]
    assert ep2 == pytest.approx(ep1, rel=1e-5)
    assert ep2[0] == pytest.approx(plain[0], rel=1e-6) and abs(ep2[2] - plain[2]) > 1e-4


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (("parallel.ep=3",), 3, r"num_local_experts \(4\) is not divisible by the expert-parallel size ep=3"),
        (("parallel.ep=2", "parallel.etp=2"), 2, r"parallel.ep \(2\) x parallel.etp \(2\) x parallel.pp \(1\) does "
                                                 r"not divide the world size \(2\)"),
        (("parallel.tp=2",), 4, r"parallel.ep > 1 with parallel.tp > 1 needs parallel.sp: true"),
        (("model.builtin=llama",), 2, r"expert parallelism \(ep=2, etp=1\) needs a mixture-of-experts model"),
        (("model.builtin=llama", "parallel.ep=1", "model.moe_aux_loss_coeff=0.1"), 2,
         r"model.moe_aux_loss_coeff is set but this llama model has no experts"),
        (("model.moe_aux_loss_coeff=-1",), 2, r"model.moe_aux_loss_coeff"),
    ],
)
def test_bad_moe_jobs_fail_before_any_process_group(overrides, world: int, message: str) -> None:
    import torch.distributed as dist

    with pytest.raises((ConfigError, ValueError), match=message):
        prepare(load_train_config(MOE_SMALL, overrides), world)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    "layout,message",
    [
        (dict(tp=2, ep=2, etp=2), r"expert layout EP=2 x ETP=2 x PP=1 does not divide the world size 2"),
        (dict(ep=2, num_experts=3), r"the expert count 3 is not divisible by EP=2"),
        (dict(tp=4), r"TP=4 x PP=1 does not divide the world size 2"),
    ],
)
def test_init_distributed_refuses_before_any_process_group(monkeypatch, layout: dict, message: str) -> None:
    import torch.distributed as dist

    from dist_lora.parallel.setup import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=message):
        init_distributed(**layout)
    assert not dist.is_initialized()


def test_qwen3_moe_gpu_config_fits_a_qwen3_30b_a3b_geometry() -> None:
    """configs/qwen3_moe_ep.yaml is valid and its layout fits the Qwen3-30B-A3B geometry on 8 GPUs
    (config only: no weights or GPU here)."""
    from transformers import Qwen3MoeConfig

    from dist_lora.bridges import check_parallel_layout, parse_hf_config
    from dist_lora.parallel.setup import check_world_layout

    config = load_train_config(os.path.join(ROOT, "configs", "qwen3_moe_ep.yaml"))
    hf = Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                        num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960)
    arch = parse_hf_config(hf.to_dict() | {"architectures": ["Qwen3MoeForCausalLM"]})
    p = config.parallel
    check_parallel_layout(arch, p.tp, p.pp, p.ep, p.etp, p.sp)
    check_world_layout(8, p.tp, p.pp, p.ep, p.etp, arch.num_experts)
    assert (arch.num_experts, arch.moe_router_topk, arch.norm_topk_prob, arch.head_dim) == (128, 8, True, 128)


@pytest.mark.slow
def test_dist_lora_train_command_at_ep2(tmp_path) -> None:
    """``torchrun -m dist_lora.cli train --config configs/moe_small.yaml`` on 2 CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dist_lora.cli",
         "train", "--config", MOE_SMALL, f"train.out_dir={tmp_path}", "train.steps=2", "train.eval_interval=0"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "EP=2 ETP=1" in result.stdout + result.stderr
    assert os.path.isfile(tmp_path / "checkpoints" / "step_00000002" / "manifest.json")
