"""Releasing PiSSA / OLoRA adapters as plain LoRA for the original base model: at save time
(``path_initial_model_for_weight_conversion``), and when consolidating a sharded TP run
(``initial_checkpoint_dir`` / ``dist-lora train``). Checked against the real PEFT on the
ORIGINAL HF model: its logits must equal those of the trained, base-rewritten model."""

from __future__ import annotations

import os

import peft
import pytest
import torch

from dist_lora import LoraConfig, get_lora_model
from dist_lora.release.consolidate import consolidate
from dist_lora.release.errors import ConsolidationError
from dist_lora.checkpoint.conversion import ConversionError, converted_config
from dist_lora.train import train
from dist_lora.train_config import load_train_config
from tests import hf_models
from tests.harness import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "cpu_small.yaml")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ids() -> torch.Tensor:
    return torch.randint(hf_models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _perturb(model, seed: int = 1) -> None:
    """Stand-in for training: move every factor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("init, use_rslora", [("pissa", False), ("olora", True)])
def test_save_pretrained_converts_for_the_original_model(tmp_path, init: str, use_rslora: bool) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=use_rslora)
    ours = get_lora_model(hf_models.tiny_llama(), config, seed=0)
    initial = tmp_path / "initial"
    ours.save_pretrained(initial)
    _perturb(ours)
    with torch.no_grad():
        expected = ours(_ids()).logits
    out = tmp_path / "released"
    ours.save_pretrained(out, path_initial_model_for_weight_conversion=initial)

    released = LoraConfig.from_pretrained(out)
    assert (released.r, released.init_lora_weights) == (8, True)
    theirs = peft.PeftModel.from_pretrained(hf_models.tiny_llama(), out)  # the ORIGINAL base weights
    theirs.eval()
    with torch.no_grad():
        got = theirs(_ids()).logits
        original = hf_models.tiny_llama()(_ids()).logits
    assert (expected - original).abs().max() > 1e-3  # the adapter does change the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_conversion_refuses_what_does_not_convert(tmp_path) -> None:
    plain = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=4, target_modules=TARGETS), seed=0)
    plain.save_pretrained(tmp_path / "initial")
    with pytest.raises(ConversionError, match="only PiSSA / OLoRA / CorDA"):
        plain.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(ConversionError, match="DoRA"):
        converted_config(LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa", use_dora=True))
    with pytest.raises(ConversionError, match="use_rslora"):
        converted_config(
            LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2})
        )

    pissa = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"), seed=0)
    other = get_lora_model(
        hf_models.tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"), seed=0
    )
    other.save_pretrained(tmp_path / "other_initial")
    with pytest.raises(ConversionError, match="has no .*v_proj.lora_A"):
        pissa.save_pretrained(tmp_path / "out2", path_initial_model_for_weight_conversion=tmp_path / "other_initial")


def _train_pissa(out: str) -> dict:
    config = load_train_config(
        SMALL, (f"train.out_dir={out}", "lora.init_lora_weights=pissa", "train.steps=4", "train.consolidate=true")
    )
    return train(config)


def test_tp_run_consolidates_to_plain_lora_for_the_original_model(tmp_path) -> None:
    """dist-lora train at TP=2 with PiSSA saves the initial adapter; the consolidated file is
    plain LoRA of rank 2r and the real PEFT on the original HF model gives megatron's logits."""
    from dist_lora.demo import verify
    from dist_lora.tiny_model import builtin_model_dir

    os.environ["DIST_LORA_CACHE"] = str(tmp_path / "cache")
    out = str(tmp_path / "run")
    run_distributed(_train_pissa, 2, tp=2, args=(out,), timeout=240)
    released = LoraConfig.from_pretrained(os.path.join(out, "adapter"))
    assert released.r == 8 and released.init_lora_weights is True
    assert verify(out, builtin_model_dir()) == 0

    checkpoint = os.path.join(out, "checkpoints", "step_00000004")
    with pytest.raises(ConsolidationError, match="--initial"):  # without the initial state: refused
        consolidate(checkpoint, tmp_path / "refused", hf_model_dir=builtin_model_dir(), show_progress=False)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ConsolidationError, match="not the same run|has no"):  # an unrelated "initial" checkpoint
        consolidate(
            checkpoint, tmp_path / "bad", hf_model_dir=builtin_model_dir(), show_progress=False,
            initial_checkpoint_dir=_other_initial(tmp_path),
        )
    assert not (tmp_path / "bad").exists()


def _other_initial(tmp_path) -> str:
    """A sharded checkpoint of a run with another rank."""
    out = str(tmp_path / "other")

    def run(out: str) -> None:
        config = load_train_config(
            SMALL, (f"train.out_dir={out}", "lora.init_lora_weights=pissa", "lora.r=2", "train.steps=1")
        )
        train(config)

    run_distributed(run, 2, tp=2, args=(out,), timeout=240)
    return os.path.join(out, "initial_adapter")
