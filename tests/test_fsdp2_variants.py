"""LoRA variants under FSDP2 at DP=2 against one process (3 AdamW steps, active clipping):
rsLoRA with rank/alpha patterns, DoRA, PiSSA and OLoRA (initialised on the full weights before
sharding), EVA (its data pass before sharding, inputs gathered over the DP ranks), a second,
inactive adapter. merge_and_unload after sharding is refused (tests/test_fsdp2.py)."""

from __future__ import annotations

import pytest

from dist_lora import initialize_lora_eva_weights
from tests import fsdp_runs
from tests.harness import run_distributed
from tests.test_fsdp2 import _check_equal

CONFIGS = {
    "rslora_patterns": dict(use_rslora=True, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                            alpha_pattern={"v_proj": 3.0}),
    "dora": dict(use_dora=True),
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_variant_dp2_equals_one_process(name):
    config = fsdp_runs.lora_config(**CONFIGS[name])
    reference = fsdp_runs.reference_run(config=config)
    _check_equal(run_distributed(fsdp_runs.fsdp_run, 2, kwargs=dict(config=config)), reference)


def _eva(model):
    """EVA on this rank's share of two batches (the whole batches without a process group)."""
    batches = []
    for step in (10, 11):
        ids = fsdp_runs.local_batch(step)
        batches.append({"input_ids": ids, "labels": ids})
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)


def test_eva_dp2_equals_one_process():
    config = fsdp_runs.lora_config(init_lora_weights="eva", r=2)
    reference = fsdp_runs.reference_run(config=config, prepare=_eva)
    _check_equal(run_distributed(fsdp_runs.fsdp_run, 2, kwargs=dict(config=config, prepare=_eva)), reference)


def _second_adapter(model):
    model.add_adapter("other", fsdp_runs.lora_config(r=2))


def test_second_inactive_adapter_dp2_equals_one_process():
    reference = fsdp_runs.reference_run(prepare=_second_adapter)
    _check_equal(run_distributed(fsdp_runs.fsdp_run, 2, kwargs=dict(prepare=_second_adapter)), reference)
