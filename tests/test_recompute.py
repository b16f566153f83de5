"""Activation recompute with LoRA inside the recomputed layers: the loss and the LoRA
gradients equal no recompute bit for bit (fp32, CPU) at TP=1 and TP=2 with SP; full recompute
of a frozen base needs the embedding output to require grad."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from dist_lora import LoraConfig, get_lora_model
from dist_lora.parallel.grads import finalize_lora_grads
from dist_lora.parallel.recompute import inputs_require_grad, recompute_settings
from tests import models
from tests.harness import run_distributed


def _step(sp: bool, kind: str, hook: bool = True) -> tuple[float, dict]:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    config = models.tiny_gpt_config(tp, sp, **recompute_settings(kind))
    model = get_lora_model(models.build_tiny_gpt(config), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), seed=0)
    if hook:
        inputs_require_grad(model)
    loss = models.gpt_loss(model, *models.random_batch(0))
    loss.backward()
    finalize_lora_grads(model)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare(sp: bool) -> dict:
    loss, grads = _step(sp, "none")
    out = {}
    for kind in ("selective", "full"):
        other_loss, other = _step(sp, kind)
        out[kind] = loss == other_loss and all(torch.equal(grads[k], other[k]) for k in grads)
    return out


@pytest.mark.parametrize("tp, sp", [(1, False), (2, True)])
def test_recompute_gives_identical_gradients(tp, sp) -> None:
    assert run_distributed(_compare, tp, tp=tp, args=(sp,))[0] == {"selective": True, "full": True}


def _full_without_hook() -> str:
    try:
        _step(False, "full", hook=False)
    except RuntimeError as e:
        return str(e)
    return ""


def test_full_recompute_of_a_frozen_base_needs_the_input_hook() -> None:
    assert "does not require grad" in run_distributed(_full_without_hook, 1)[0]


def test_unknown_recompute_is_refused() -> None:
    with pytest.raises(ValueError, match="recompute must be one of none, selective, full"):
        recompute_settings("partial")
