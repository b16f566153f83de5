"""Meta-device construction with rank-local loading (dist_lora.fsdp.meta) equals building the
whole model and sharding it: same losses and adapters after 3 steps at DP=2 and DP=4."""

from __future__ import annotations

import pytest

from dist_lora.config import ConfigError
from dist_lora.fsdp.meta import check_meta_config
from tests import fsdp_runs
from tests.harness import run_distributed
from tests.hf_models import save_base, tiny_llama
from tests.test_fsdp2 import _check_equal


@pytest.mark.parametrize("world_size", [2, 4])
def test_meta_built_model_equals_one_process(tmp_path, world_size):
    hf_dir = save_base(tiny_llama(seed=0), tmp_path / "base")
    reference = fsdp_runs.reference_run()
    _check_equal(run_distributed(fsdp_runs.meta_run, world_size, args=(hf_dir,)), reference)


@pytest.mark.parametrize("field, value", [("use_dora", True), ("init_lora_weights", "pissa"),
                                          ("modules_to_save", ["lm_head"])])
def test_meta_refuses_inits_that_need_the_full_weight(field, value):
    with pytest.raises(ConfigError, match="load_sharded_lora_model cannot initialise"):
        check_meta_config(fsdp_runs.lora_config(**{field: value}))
