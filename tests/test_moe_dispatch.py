"""megatron's MoE token dispatchers run on CPU ranks (gloo) through dist_lora's compatibility layer.

The all-to-all dispatcher needs :mod:`dist_lora.parallel.cpu_compat` (host "streams", split
sizes as ints, the router's matmul without Transformer Engine); the all-gather dispatcher sends
the same tokens to the same experts by another route, so both must give the same loss.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed
from tests.models import build_tiny_gpt, random_batch, tiny_gpt_config


def _moe_loss(tp: int, ep: int, dispatcher: str) -> float:
    config = tiny_gpt_config(
        tp,
        tp > 1,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=96,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
        moe_token_dispatcher_type=dispatcher,
        moe_aux_loss_coeff=0.0,
    )
    model = build_tiny_gpt(config)
    tokens, labels = random_batch(0)
    loss = model(tokens, position_ids=None, attention_mask=None, labels=labels).mean()
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("tp, ep", [(1, 2), (2, 2)])
def test_alltoall_dispatcher_matches_allgather_on_cpu(tp: int, ep: int) -> None:
    kwargs = dict(tp=tp, ep=ep, etp=1)
    alltoall = run_distributed(_moe_loss, tp * ep, args=(tp, ep, "alltoall"), **kwargs)
    allgather = run_distributed(_moe_loss, tp * ep, args=(tp, ep, "allgather"), **kwargs)
    assert len(set(alltoall)) == 1
    torch.testing.assert_close(torch.tensor(alltoall), torch.tensor(allgather), rtol=1e-6, atol=1e-6)
