"""The FLOPs formula against torch's own FLOP counter on a LoRA step of a tiny HF Llama
(forward + backward, frozen base)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_lora.flops import flops_per_token, frozen_linear_params, mfu
from tests import hf_models


def test_formula_matches_torch_flop_counter_on_a_peft_model() -> None:
    """torch's FLOP counter sees PEFT's LoRA (plain nn.Linear factors) and eager attention as
    mm/bmm; the embedding output requires grad so that every layer's input gradient is
    computed, as the formula assumes."""
    import peft

    base = hf_models.tiny_llama()
    base.config._attn_implementation = "eager"
    c = base.config
    head_dim = c.hidden_size // c.num_attention_heads
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear"))
    model.enable_input_require_grads()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch, seq = 2, 16
    ids = hf_models.sample_ids(batch=batch, seq=seq)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    expected = flops_per_token(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                               c.num_key_value_heads, head_dim, c.vocab_size, seq, lora)
    assert counter.get_total_flops() == expected * batch * seq


def test_frozen_linear_params_counts_the_model_linears() -> None:
    base = hf_models.tiny_llama()
    c = base.config
    linears = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    head_dim = c.hidden_size // c.num_attention_heads
    assert frozen_linear_params(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                c.num_key_value_heads, head_dim, c.vocab_size) == linears


def test_mfu() -> None:
    assert mfu(6 * 10**9, 1000.0, None, 1) is None
    assert mfu(6 * 10**9, 1000.0, 1.0, 2) == 3.0
