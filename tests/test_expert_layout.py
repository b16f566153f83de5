"""The stacked-expert layout of :mod:`dist_lora.expert_layout` against the real PEFT 0.21
(its ParamWrapper's delta and saved keys) and transformers 5.24 (the fused gate_up order)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import pytest
import torch

from dist_lora.expert_layout import (
    expert_count, expert_delta, gate_up_rows, parameter_geometry, peft_parameter_key, stack_experts, unstack_experts,
)

try:
    from . import hf_models
except ImportError:
    import hf_models

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = "mlp.gate.weight"
FAMILIES = {"qwen3_moe": hf_models.tiny_qwen3_moe, "mixtral": hf_models.tiny_mixtral}


def _expert_factors(experts: int, r: int, in_f: int, out_f: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {e: (torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)) for e in range(experts)}


def test_stack_unstack_round_trip_and_expert_count():
    factors = _expert_factors(3, 2, 5, 7)
    lora_a, lora_b = stack_experts(factors)
    assert lora_a.shape == (6, 5) and lora_b.shape == (7, 6)
    assert expert_count(lora_a, lora_b, r=2) == 3
    back = unstack_experts(lora_a, lora_b, 3)
    for e, (a, b) in factors.items():
        assert torch.equal(back[e][0], a) and torch.equal(back[e][1], b)
    with pytest.raises(ValueError, match="experts 0..E-1"):
        stack_experts({0: factors[0], 2: factors[2]})
    with pytest.raises(ValueError, match="do not hold 4 experts"):
        unstack_experts(lora_a, lora_b, 4)


def test_stacked_factors_give_peft_delta_per_expert():
    """Per-expert factors stacked by stack_experts into a real PEFT ParamWrapper: PEFT's delta
    for expert e is s · B_e A_e in the parameter's [out, in] orientation (and expert_delta's)."""
    base = hf_models.tiny_qwen3_moe()
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=EXPERTS)
    model = peft.get_peft_model(base, config)
    outer = model.base_model.model.model.layers[0].mlp.experts  # down_proj's wrapper, over gate_up_proj's
    for wrapper, shape in ((outer, (4, 32, 24)), (outer.base_layer, (4, 48, 32))):
        experts, out_f, in_f = shape
        factors = _expert_factors(experts, 2, in_f, out_f, seed=out_f)
        lora_a, lora_b = stack_experts(factors)
        with torch.no_grad():
            wrapper.lora_A["default"].weight.copy_(lora_a)
            wrapper.lora_B["default"].weight.copy_(lora_b)
        peft_delta = wrapper.get_delta_weight("default")
        assert peft_delta.shape == shape
        for e, (a, b) in factors.items():
            torch.testing.assert_close(peft_delta[e], 3.0 * b @ a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(expert_delta(lora_a, lora_b, experts, 3.0), peft_delta, rtol=1e-5, atol=1e-5)


def test_transformers_gate_up_is_concatenated_gate_then_up():
    """transformers 5.24's fused gate_up_proj[e] is [gate; up] rows (megatron's fc1 order):
    the experts module computes act(G x) * (U x) with G = rows [0, I), U = rows [I, 2I)."""
    for family in FAMILIES:
        experts = FAMILIES[family]().model.layers[0].mlp.experts
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            out = experts(x, torch.full((5, 1), 2), torch.ones(5, 1))
            w, down = experts.gate_up_proj[2], experts.down_proj[2]
            half = w.shape[0] // 2
            expected = (experts.act_fn(x @ w[:half].T) * (x @ w[half:].T)) @ down.T
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert experts.is_concatenated and not experts.is_transposed
    rows = torch.arange(8.0)[:, None]
    assert torch.equal(gate_up_rows(rows, interleaved=False), rows)
    interleaved = gate_up_rows(rows, interleaved=True)
    assert interleaved.flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(gate_up_rows(interleaved, interleaved=True, inverse=True), rows)


def test_peft_parameter_key_is_peft_nesting():
    """Which saved key holds which parameter's adapter (told apart by lora_A's in_features)."""
    in_features = {"gate_up_proj": 32, "down_proj": 48, "weight": 32}  # tiny Mixtral, r=8, 4 experts
    experts = {"gate_up_proj": 4, "down_proj": 4, "weight": 1}
    for targets in (EXPERTS, EXPERTS[::-1], EXPERTS[1:], [*EXPERTS, ROUTER]):
        model = peft.get_peft_model(hf_models.tiny_mixtral(), peft.LoraConfig(target_modules=[], target_parameters=targets))
        saved = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(model).items() if ".layers.1." in k}
        expected = {}
        for module, params in (("model.layers.1.mlp.experts", ["gate_up_proj", "down_proj"]), ("model.layers.1.mlp.gate", ["weight"])):
            targeted = [p for p in params if any(f"{module}.{p}".endswith(t) for t in targets)]
            for param in targeted:
                key = f"base_model.model.{peft_parameter_key(module, param, targeted)}.lora_A.weight"
                expected[key] = (8 * experts[param], in_features[param])
        assert expected and expected == {k: v for k, v in saved.items() if k.endswith("lora_A.weight")}


def test_parameter_geometry_reads_shapes_as_peft():
    assert parameter_geometry((4, 48, 32)) == (4, 32, 48)  # [E, out, in]: gate_up_proj [E, 2I, H]
    assert parameter_geometry((4, 48, 32), transposed=True) == (4, 48, 32)  # [E, in, out]
    assert parameter_geometry((6, 32)) == (1, 32, 6)  # a router weight [E, H]
    with pytest.raises(ValueError, match="only 2-D"):
        parameter_geometry((8,))
