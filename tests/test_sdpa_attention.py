"""SDPA core attention equals megatron's local attention (fp32, CPU): the loss and every
parameter's gathered gradient of a tiny GPTModel at TP 1/2/4, sequence parallel off and on,
causal and with a packed block-diagonal mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from dist_lora.bridges.attention import SDPAttention, with_sdpa_attention
from dist_lora.data.packing import attention_mask
from tests import models
from tests.harness import run_distributed
from tests.tp_utils import gather_param

MODEL = dict(num_attention_heads=8, num_query_groups=4)  # GQA (2 query heads per group) that divides over TP=4


def _gpt(tp: int, sp: bool, sdpa: bool) -> GPTModel:
    config = models.tiny_gpt_config(tp, sp, **MODEL)
    block = models.gpt_local_block_spec(config)
    if sdpa:
        block = dataclasses.replace(block, layer_specs=[with_sdpa_attention(s) for s in block.layer_specs])
    model = GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=models.VOCAB, max_sequence_length=models.SEQ,
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
    )
    assert any(isinstance(m, SDPAttention) for m in model.modules()) == sdpa
    return model


def _loss_and_grads(sp: bool, sdpa: bool, packed: bool) -> dict:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    torch.manual_seed(0)
    model = _gpt(tp, sp, sdpa)
    tokens, labels = models.random_batch(0)
    mask = None
    if packed:  # three documents per row: no token may see another document
        documents = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])
        mask = attention_mask(documents)
    loss = model(tokens, position_ids=None, attention_mask=mask, labels=labels).mean()
    loss.backward()
    holder = {}
    for name, p in model.named_parameters():
        g = p.detach().clone()
        g.data = p.grad
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(p, attr):
                setattr(g, attr, getattr(p, attr))
        holder[name] = gather_param(g)
    return {"loss": loss.item(), "grads": holder}


def _compare(sp: bool, packed: bool) -> tuple[float, float]:
    ref = _loss_and_grads(sp, False, packed)
    new = _loss_and_grads(sp, True, packed)
    grads = max((ref["grads"][k] - new["grads"][k]).abs().max().item() for k in ref["grads"])
    return abs(ref["loss"] - new["loss"]), grads


@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True), (4, False), (4, True)])
@pytest.mark.parametrize("packed", [False, True])
def test_sdpa_equals_megatron_local_attention(tp, sp, packed) -> None:
    loss_diff, grad_diff = run_distributed(_compare, tp, tp=tp, args=(sp, packed))[0]
    assert loss_diff < 1e-6 and grad_diff < 1e-5, (loss_diff, grad_diff)


def _mask_matters() -> float:
    causal = _loss_and_grads(False, True, False)["loss"]
    packed = _loss_and_grads(False, True, True)["loss"]
    return abs(causal - packed)


def test_the_packed_mask_reaches_sdpa() -> None:
    assert run_distributed(_mask_matters, 1)[0] > 1e-4
