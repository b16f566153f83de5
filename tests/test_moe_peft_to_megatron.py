"""A PEFT MoE adapter (target_parameters on transformers 5's fused experts and router, plus
attention target_modules) -> megatron at EP=2 (TP=1 and TP=2 with SP): the same logits as PEFT on
the transformers model (fp32, 1e-4), every expert receiving tokens. The adapter is made with the
REAL PEFT (``init_lora_weights=False``: B != 0) on tiny random Mixtral and Qwen3-MoE models. An
adapter for a model with another expert count is refused, the megatron model untouched."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from dist_lora.release.to_megatron import load_peft_adapter_into_megatron
from dist_lora.release.translate import PeftToMegatronError, translate_peft_adapter
from tests.harness import run_distributed
from tests.hf_models import VOCAB, tiny_mixtral, tiny_qwen3_moe

BATCH, SEQ, EXPERTS = 2, 16, 4
TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe}


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def _adapter(kind: str, root, targets: tuple = tuple(TARGET_PARAMETERS), **model_overrides) -> dict:
    """The HF model dir, a PEFT adapter dir, PEFT's logits and the experts that got tokens."""
    model = MODELS[kind](seed=3, **model_overrides)
    hf_dir, adapter_dir = str(root / "hf"), str(root / "adapter")
    model.save_pretrained(hf_dir)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], target_parameters=list(targets),
                             rank_pattern={"model.layers.1.mlp.experts.down_proj": 3}, init_lora_weights=False)
    torch.manual_seed(4)
    peft_model = peft.get_peft_model(model, config).eval()
    peft_model.save_pretrained(adapter_dir)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                            adapter_dir).eval()
    with torch.no_grad():
        out = loaded(input_ids=_ids(), output_router_logits=True)
        with loaded.disable_adapter():
            base = loaded(input_ids=_ids()).logits
    used = {(i, int(e)) for i, logits in enumerate(out.router_logits) for e in logits.topk(2, dim=-1).indices.unique()}
    return {"hf": hf_dir, "adapter": adapter_dir, "logits": out.logits, "base": base, "used": used}


def _megatron_logits(hf_dir: str, adapter_dir: str, tp: int, ep: int) -> torch.Tensor:
    from dist_lora.bridges import build_megatron_gpt
    from tests.tp_utils import gather_tp

    gpt = build_megatron_gpt(hf_dir, tp=tp, sequence_parallel=tp > 1, ep=ep, etp=1)
    model = load_peft_adapter_into_megatron(gpt, adapter_dir, hf_dir).eval()
    with torch.no_grad():
        out = model(_ids(), None, None)
    return gather_tp(out, dim=-1)


@pytest.mark.parametrize("kind,tp", [("mixtral", 1), ("qwen3_moe", 2)])
def test_peft_moe_adapter_loads_into_megatron_at_ep2(tmp_path, kind: str, tp: int) -> None:
    made = _adapter(kind, tmp_path)
    assert made["used"] == {(i, e) for i in range(2) for e in range(EXPERTS)}
    assert (made["logits"] - made["base"]).abs().max() > 1e-2  # the adapter changes the function
    translated = translate_peft_adapter(made["adapter"], made["hf"])
    assert translated.modules["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2"].r == 3
    assert translated.config.target_parameters is None
    for logits in run_distributed(_megatron_logits, 2, tp=tp, ep=2, etp=1, args=(made["hf"], made["adapter"], tp, 2)):
        torch.testing.assert_close(logits, made["logits"], atol=1e-4, rtol=0)


def _refused_untouched(hf_dir: str, adapter_dir: str) -> str:
    from dist_lora.bridges import build_megatron_gpt

    gpt = build_megatron_gpt(hf_dir, ep=1, etp=1)
    before = {k: v.clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(PeftToMegatronError) as info:
        load_peft_adapter_into_megatron(gpt, adapter_dir, hf_dir)
    after = {k: v for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in gpt.parameters())
    return str(info.value)


def test_adapter_with_another_expert_count_is_refused_model_untouched(tmp_path) -> None:
    made = _adapter("mixtral", tmp_path / "eight", num_local_experts=8)
    model4 = tmp_path / "four"
    tiny_mixtral(seed=3).save_pretrained(model4)
    message = run_distributed(_refused_untouched, 1, args=(str(model4), made["adapter"]))[0]
    assert "holds 8 experts (the router's lora_B rows)" in message and "has 4" in message, message
    experts_only = _adapter("mixtral", tmp_path / "experts_only", targets=TARGET_PARAMETERS[:2], num_local_experts=8)
    with pytest.raises(PeftToMegatronError, match=r"holds 8 experts \(lora_A rows 16 / r 2\), .* has 4"):
        translate_peft_adapter(experts_only["adapter"], str(model4))
