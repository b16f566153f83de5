"""`dist-lora train` with parallel.backend=fsdp2: DP=2 equals DP=1 (same global batch), the
released adapter loads in PEFT, packed samples see only themselves; config refusals."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel

from dist_lora.config import ConfigError
from dist_lora.data.sft import Batch
from dist_lora.train_config import load_train_config
from dist_lora.train_fsdp2 import hf_forward_kwargs
from tests.harness import run_distributed
from tests.hf_models import sample_ids, tiny_llama

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "fsdp2_small.yaml")


def _job(out_dir: str, overrides: list[str], resume=None) -> dict:
    from dist_lora.train_fsdp2 import train_fsdp2

    config = load_train_config(CONFIG, (f"train.out_dir={out_dir}", "train.steps=3", "train.eval_interval=0",
                                        "train.checkpoint_interval=2", *overrides))
    summary = train_fsdp2(config, resume=resume)
    return {"losses": summary["losses"], "adapter": summary.get("adapter"), "hf_dir": summary["hf_dir"]}


def test_fsdp2_job_dp2_equals_dp1_and_releases_a_peft_adapter(tmp_path):
    """DP=2 x grad_accum 2 reads the same global batches as DP=1 x grad_accum 4: the same losses."""
    two = run_distributed(_job, 2, args=(str(tmp_path / "dp2"), ["train.grad_accum=2"]), timeout=300)[0]
    one = run_distributed(_job, 1, args=(str(tmp_path / "dp1"), ["train.grad_accum=4"]), timeout=300)[0]
    assert list(two["losses"]) == [0, 1, 2]
    assert list(two["losses"].values()) == pytest.approx(list(one["losses"].values()), abs=1e-5)
    assert sorted(os.listdir(tmp_path / "dp2" / "checkpoints")) == ["latest", "step_00000002", "step_00000003"]
    # resume the DP=2 run from step 2 at DP=1: step 3 is redone (step_3 moved aside) with the same loss
    step2 = str(tmp_path / "dp2" / "checkpoints" / "step_00000002")
    resumed = run_distributed(_job, 1, args=(str(tmp_path / "dp2"), ["train.grad_accum=4"]),
                              kwargs=dict(resume=step2), timeout=300)[0]
    assert list(resumed["losses"]) == [2] and resumed["losses"][2] == pytest.approx(two["losses"][2], abs=1e-5)
    assert any(n.startswith("superseded_") for n in os.listdir(tmp_path / "dp2" / "checkpoints"))
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(two["hf_dir"]), two["adapter"])
    assert len(peft.targeted_module_names) == 14  # 7 linear layers x 2 decoder layers


def test_fsdp2_job_on_instruction_data_dp2_equals_dp1(tmp_path):
    """The instruction-data path (built-in chat messages, loss on the answers only, packed with
    document boundaries) under FSDP2: DP=2 reads the same global batches as DP=1."""
    sft = ["data.format=messages", "data.seq_len=256", "data.packing=true", "train.micro_batch_size=1",
           "train.consolidate=false"]
    two = run_distributed(_job, 2, args=(str(tmp_path / "dp2"), [*sft, "train.grad_accum=2"]), timeout=300)[0]
    one = run_distributed(_job, 1, args=(str(tmp_path / "dp1"), [*sft, "train.grad_accum=4"]), timeout=300)[0]
    assert list(two["losses"]) == [0, 1, 2]
    assert list(two["losses"].values()) == pytest.approx(list(one["losses"].values()), abs=1e-5)


def test_packed_samples_see_only_themselves():
    """The 4-D additive mask and restarted positions make a packed row compute what each sample
    computes alone (break: drop the mask and the second sample's logits change)."""
    model = tiny_llama()
    ids = sample_ids(1, 7)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    batch = Batch(ids, ids, positions, docs)
    with torch.no_grad():
        packed = model(**hf_forward_kwargs(batch, torch.float32)).logits
        first, second = model(input_ids=ids[:, :3]).logits, model(input_ids=ids[:, 3:]).logits
    torch.testing.assert_close(packed[:, :3], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 3:], second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=2", "set parallel.tp, pp, ep and etp to 1"),
    ("parallel.ep=2", "set parallel.tp, pp, ep and etp to 1"),
    ("model.dtype=fp16", "use bf16"),
    ("train.recompute=selective", "use none or full"),
    ("model.attention=megatron", "model.attention=sdpa"),
    ("parallel.backend=fsdp", "parallel.backend must be one of megatron, fsdp2"),
])
def test_fsdp2_config_refusals(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(CONFIG, (override,))


def test_fsdp2_job_with_dora_loads_whole_model_and_releases_magnitudes(tmp_path):
    """DoRA needs the full base weight at init: the job loads the model whole, then shards it."""
    from safetensors import safe_open

    out = run_distributed(_job, 2, args=(str(tmp_path / "dora"), ["lora.use_dora=true"]), timeout=300)[0]
    with safe_open(os.path.join(out["adapter"], "adapter_model.safetensors"), "pt") as f:
        assert sum(k.endswith("lora_magnitude_vector") for k in f.keys()) == 14
