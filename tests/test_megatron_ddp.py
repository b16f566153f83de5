"""dist_lora inside megatron's own training machinery: its DistributedDataParallel (gradients
in ``main_grad`` buffers) and its ``finalize_model_grads``, extended by
``make_finalize_model_grads_func`` with the bucketed TP sum of the LoRA partial gradients.
With ``qk_layernorm`` (Qwen3) and trainable copies of the q/k norms, whose gradients megatron's
finalize sums over TP itself (by name), the hook must not sum them a second time."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from dist_lora import LoraConfig, get_lora_model
from dist_lora.parallel.grads import make_finalize_model_grads_func
from tests.harness import run_distributed
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config
from tests.tp_utils import gather_param

MODEL = dict(num_attention_heads=8, num_query_groups=4)


def _ddp_grads(sp: bool, with_hook: bool, qk: bool = False) -> dict[str, torch.Tensor]:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = tiny_gpt_config(tp, sp, **MODEL, qk_layernorm=qk)
    saved = ["q_layernorm", "k_layernorm"] if qk else None
    lora = LoraConfig(r=4, init_lora_weights=False, modules_to_save=saved)
    model = get_lora_model(build_tiny_gpt(config), lora, seed=0)
    assert sum("layernorm.modules_to_save" in n for n, _ in model.named_parameters()) == (4 if qk else 0)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False), model
    )
    gpt_loss(ddp, *random_batch(0)).backward()
    (make_finalize_model_grads_func() if with_hook else finalize_model_grads)([ddp])
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.main_grad.detach().clone()
            grad.__dict__.update({k: v for k, v in param.__dict__.items() if k.startswith(("tensor_", "partition_"))})
            grads[name] = gather_param(grad)
    return grads


def _max_rel(got: dict, want: dict) -> float:
    return max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


@pytest.mark.parametrize("sp,qk", [(False, False), (True, False), (True, True)])
def test_megatron_ddp_with_the_finalize_hook_matches_tp1(sp: bool, qk: bool) -> None:
    reference = run_distributed(_ddp_grads, 1, args=(False, True, qk))[0]
    hooked = run_distributed(_ddp_grads, 2, tp=2, args=(sp, True, qk))[0]
    assert _max_rel(hooked, reference) < 1e-5
    plain = run_distributed(_ddp_grads, 2, tp=2, args=(sp, False, qk))[0]
    assert _max_rel(plain, reference) > 1e-2, "without the hook the partial TP gradients are not summed"
