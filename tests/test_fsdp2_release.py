"""An FSDP2 run released: save_pretrained from rank 0 and `dist-lora consolidate` of its DCP
checkpoint both give a PEFT adapter that the real PEFT loads with the training model's logits."""

from __future__ import annotations

import os

import torch
from peft import PeftModel
from safetensors.torch import load_file

from dist_lora.cli import main as cli_main
from tests import fsdp_runs
from tests.harness import run_distributed
from tests.hf_models import save_base, tiny_llama


def _peft_logits(adapter_dir):
    model = PeftModel.from_pretrained(tiny_llama(seed=0), adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(input_ids=fsdp_runs.batch(0)).logits


def test_release_at_dp4_loads_in_peft_with_training_logits(tmp_path):
    """r=2 at DP=4: A [2, in] leaves two ranks with empty shards; the saved adapter is still full."""
    root, saved, consolidated = (str(tmp_path / n) for n in ("ckpt", "saved", "consolidated"))
    hf_dir = save_base(tiny_llama(seed=0), tmp_path / "base")
    config = fsdp_runs.lora_config(r=2, lora_alpha=4)
    logits = run_distributed(fsdp_runs.released_run, 4, args=(root, saved), kwargs=dict(config=config))
    for rank_logits in logits[1:]:
        torch.testing.assert_close(rank_logits, logits[0], atol=0, rtol=0)
    assert cli_main(["consolidate", root, consolidated, "--hf-model", hf_dir, "--no-progress"]) == 0
    written, released = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (saved, consolidated))
    assert written.keys() == released.keys() and len(written) == 2 * 7 * 2  # A, B x 7 modules x 2 layers
    for key, tensor in written.items():
        assert tensor.shape == released[key].shape and tensor.numel() > 0, key
        torch.testing.assert_close(tensor, released[key], atol=0, rtol=0, msg=key)
        assert tensor.shape[0 if "lora_A" in key else 1] == 2, key
    for directory in (saved, consolidated):
        torch.testing.assert_close(_peft_logits(directory), logits[0], atol=1e-5, rtol=1e-5)


def test_consolidate_refuses_megatron_format_for_dcp(tmp_path, capsys):
    root = str(tmp_path / "ckpt")
    run_distributed(fsdp_runs.resumed_run, 2, args=(root, 0, 1))
    assert cli_main(["consolidate", root, str(tmp_path / "out"), "--format", "megatron"]) == 2
    assert "FSDP2 (DCP) checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_pissa_release_converted_for_the_original_base(tmp_path):
    """PiSSA rewrites the base: save_pretrained under FSDP2 with the initial adapter gives a
    rank-2r plain LoRA adapter that PEFT loads on the ORIGINAL model with the training logits."""
    initial, out = str(tmp_path / "initial"), str(tmp_path / "out")
    logits = run_distributed(fsdp_runs.converted_release_run, 2, args=(initial, out))[0]
    assert '"r": 8' in open(os.path.join(out, "adapter_config.json")).read()
    torch.testing.assert_close(_peft_logits(out), logits, atol=1e-4, rtol=1e-4)
