"""The training job: the demo end to end, a 2-"node" loopback launch, resume, and bad input.

Jobs started through torchrun spawn fresh interpreters (seconds each), so only the demo and
the two-node launch do that; the rest run `train()` inside the forked test harness.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dist_lora.config import ConfigError
from dist_lora.train import prepare, train
from dist_lora.train_config import load_train_config
from tests.harness import DistributedError, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "cpu_small.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory) -> None:
    """The built-in tiny model goes to a per-session cache (created once)."""
    os.environ["DIST_LORA_CACHE"] = ENV["DIST_LORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_end_to_end(tmp_path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "dist_lora.cli", "demo", "--out", str(out), "train.steps=20", "train.eval_interval=10"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "max |logits difference|" in result.stdout and "(OK" in result.stdout
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "eval loss" in result.stderr + result.stdout


def test_two_nodes_on_loopback(tmp_path) -> None:
    """Two launcher invocations of launch/torchrun.sh, one process each, TP=2 across them."""
    port = _free_port()
    common = {**ENV, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
              "PYTHON": sys.executable}
    args = ["bash", os.path.join(ROOT, "launch", "torchrun.sh"), "--config", SMALL,
            f"train.out_dir={tmp_path}", "train.steps=4"]
    nodes = [subprocess.Popen(args, env={**common, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "TP=2" in outputs[0]
    assert os.path.isfile(tmp_path / "checkpoints" / "step_00000004" / "manifest.json")


def _run(out: str, *overrides: str, resume: str | None = None) -> dict:
    config = load_train_config(SMALL, (f"train.out_dir={out}", *overrides))
    return train(config, resume=resume)["losses"]


def test_resume_reproduces_losses(tmp_path) -> None:
    full = run_distributed(_run, 2, tp=2, args=(str(tmp_path / "a"),))[0]
    run_distributed(_run, 2, tp=2, args=(str(tmp_path / "b"),))
    resumed = run_distributed(
        _run, 2, tp=2, args=(str(tmp_path / "b"),), kwargs={"resume": str(tmp_path / "b/checkpoints/step_00000004")}
    )[0]
    assert sorted(resumed) == [4, 5, 6, 7]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-5)
    assert full[7] < full[0], "the loss did not fall"


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_pipeline_parallel_matches_tp_only_and_consolidates(tmp_path, tp: int, pp: int) -> None:
    """Megatron's 1F1B schedule on CPU: PP=2 (with TP=1 or 2) gives TP-only losses, and its
    consolidated adapter loads in PEFT with the megatron model's logits."""
    from dist_lora.demo import verify
    from dist_lora.tiny_model import builtin_model_dir

    reference = run_distributed(_run, 2, tp=2, args=(str(tmp_path / "tp"),))[0]
    out = str(tmp_path / "pp")
    piped = run_distributed(
        _run, tp * pp, tp=tp, pp=pp, args=(out, f"parallel.tp={tp}", f"parallel.pp={pp}", "train.consolidate=true")
    )[0]
    assert piped == pytest.approx(reference, rel=1e-5)
    assert verify(out, builtin_model_dir()) == 0


def test_qwen3_model_dir_trains_layout_invariantly_and_consolidates(tmp_path) -> None:
    """A Qwen3 checkpoint (q/k norms, head_dim 12 != hidden/heads) trains through the bridge,
    with trainable copies of the q/k norms (modules_to_save): TP=2 + SP gives TP=1's losses, which
    needs their per-rank partial gradients (each rank normalises its own heads) summed over TP;
    the consolidated adapter (q/k norm copies as ``self_attn.q_norm`` / ``k_norm``) loads in PEFT
    with the megatron model's logits."""
    import json

    from safetensors.torch import load_file

    from dist_lora.demo import verify
    from tests.hf_models import tiny_qwen3

    qwen3 = str(tmp_path / "qwen3")
    tiny_qwen3(vocab_size=256, hidden_size=64, num_attention_heads=8, num_key_value_heads=4).save_pretrained(qwen3)
    common = (f"model.hf_dir={qwen3}", "train.steps=3", "train.eval_interval=0", "train.checkpoint_interval=3",
              "lora.modules_to_save=[q_layernorm, k_layernorm]", "optim.lr=0.01", "optim.warmup_steps=0")
    single = run_distributed(_run, 1, tp=1, args=(str(tmp_path / "tp1"), "parallel.tp=1", *common))[0]
    out = str(tmp_path / "tp2")
    split = run_distributed(_run, 2, tp=2, args=(out, "parallel.sp=true", "train.consolidate=true", *common))[0]
    assert split == pytest.approx(single, rel=1e-5) and split[2] != split[0]
    assert verify(out, qwen3) == 0
    saved = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))["modules_to_save"]
    assert saved == [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("k_norm", "q_norm")]
    trained = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    base = load_file(os.path.join(qwen3, "model.safetensors"))
    for name in saved:  # the copies were trained (PEFT's logits above used them)
        assert (trained[f"base_model.model.{name}.weight"] - base[f"{name}.weight"]).abs().max() > 1e-3, name


def test_resume_from_another_model_says_what_differs(tmp_path) -> None:
    run_distributed(_run, 2, tp=2, args=(str(tmp_path),))
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_lora.tiny_model import TINY_LLAMA

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 3})).save_pretrained(other)
    with pytest.raises(DistributedError, match="num_layers 2 in the checkpoint, 3 now"):
        run_distributed(_run, 2, tp=2, args=(str(tmp_path), f"model.hf_dir={other}"), kwargs={"resume": ""})


def test_unknown_key_names_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key train.step; did you mean train.steps\?"):
        load_train_config(SMALL, ("train.step=3",))
    with pytest.raises(ConfigError, match=r"lora.lora_alhpa; did you mean lora.lora_alpha\?"):
        load_train_config(SMALL, ("lora.lora_alhpa=3",))
    with pytest.raises(ConfigError, match=r"unknown config key paralel; did you mean parallel\?"):
        load_train_config(SMALL, ("paralel.tp=2",))


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (("parallel.tp=3",), 3, r"num_attention_heads \(8\) is not divisible by the tensor-parallel size 3"),
        (("parallel.tp=2",), 3, r"parallel.tp \(2\) x parallel.pp \(1\) does not divide the world size \(3\)"),
        (("parallel.tp=16",), 16, "not divisible by the tensor-parallel size 16"),
    ],
)
def test_bad_layouts_fail_before_any_process_group(overrides, world: int, message: str) -> None:
    import torch.distributed as dist

    with pytest.raises((ConfigError, ValueError), match=message):
        prepare(load_train_config(SMALL, overrides), world)
    assert not dist.is_initialized()


def test_missing_or_empty_data(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="data file .*nope.txt does not exist"):
        prepare(load_train_config(SMALL, (f"data.path={tmp_path}/nope.txt",)), 2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="contains no text"):
        prepare(load_train_config(SMALL, (f"data.path={empty}",)), 2)


def test_bad_data_fails_on_every_rank_without_hanging(tmp_path) -> None:
    """Under torchrun each rank reports the error and exits; nobody waits in a collective."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "dist_lora.cli", "train", "--config", SMALL, f"data.path={tmp_path}/missing.txt"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.count("missing.txt does not exist") == 2, result.stderr[-2000:]


def _schedule_vs_direct() -> tuple[float, float]:
    import torch

    from dist_lora import get_lora_model
    from dist_lora.bridges import build_megatron_gpt
    from dist_lora.data import PackedDataset
    from dist_lora.train import run_microbatches
    from dist_lora.tiny_model import builtin_model_dir

    config = load_train_config(SMALL)
    _, _, dataset = prepare(config, 2)
    assert isinstance(dataset, PackedDataset)
    model = get_lora_model(build_megatron_gpt(builtin_model_dir(), tp=2), config.lora_config())
    batches = [dataset.batch("eval", i, 2) for i in range(3)]
    with torch.no_grad():
        direct = sum(model(t, position_ids=None, attention_mask=None, labels=l).mean().item() for t, l in batches) / 3
        scheduled = run_microbatches(model, batches, config, forward_only=True)
    return direct, scheduled


def test_schedule_reports_the_mean_micro_batch_loss() -> None:
    """megatron's schedule divides the loss by the number of micro-batches in place; the
    reported loss must still be the plain mean."""
    direct, scheduled = run_distributed(_schedule_vs_direct, 2, tp=2)[0]
    assert scheduled == pytest.approx(direct, rel=1e-6)
