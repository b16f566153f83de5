"""Layout invariance, the heart of the suite: a tiny megatron GPTModel (2 layers, GQA,
SwiGLU, RMSNorm, RoPE) with LoRA on linear_qkv, linear_proj, linear_fc1 and linear_fc2
computes the same loss, the same gathered adapter gradients and the same adapters after a
few AdamW steps at TP=1, 2 and 4, with sequence parallelism off and on; replicated factors
stay bit-identical on every TP rank."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from dist_lora import LoraConfig, get_lora_model
from dist_lora.parallel.grads import finalize_lora_grads
from tests.harness import run_distributed
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config
from tests.tp_utils import all_tp_copies, gather_param

STEPS = 3
# 8 heads in 4 query groups: GQA that still divides over TP=4.
MODEL = dict(num_attention_heads=8, num_query_groups=4)


def _lora(comm: str) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"linear_fc2": 2}, use_rslora=True,
        runtime_config={"tp_comm": comm},
    )


def _train(sp: bool, comm: str = "fused") -> dict:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, sp, **MODEL)), _lora(comm), seed=0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_" in n for n in params)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    losses, first_grads = [], None
    for step in range(STEPS):
        tokens, labels = random_batch(step)
        loss = gpt_loss(model, tokens, labels)
        loss.backward()
        finalize_lora_grads(model)
        if first_grads is None:
            first_grads = {n: gather_param_grad(p) for n, p in params.items()}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    replicated = [p for p in params.values() if not getattr(p, "tensor_model_parallel", False)]
    replica_diff = max(
        (c - p.detach()).abs().max().item() for p in replicated for c in all_tp_copies(p.detach())
    )
    return {
        "losses": losses,
        "grads": first_grads,
        "adapters": {n: gather_param(p) for n, p in params.items()},
        "replica_diff": replica_diff,
        "n_replicated": len(replicated),
    }


def gather_param_grad(param: torch.nn.Parameter) -> torch.Tensor:
    grad = param.grad.detach()
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attr):
            setattr(grad, attr, getattr(param, attr))
    return gather_param(grad)


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_distributed(_train, 1, tp=1, args=(False,))[0]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)


@pytest.mark.parametrize(
    "tp,sp,comm",
    [(2, False, "fused"), (2, True, "fused"), (4, False, "fused"), (4, True, "fused"),
     (2, True, "reference"), (4, False, "reference")],
)
def test_tp_layouts_match_tp1(reference: dict, tp: int, sp: bool, comm: str) -> None:
    results = run_distributed(_train, tp, tp=tp, args=(sp, comm))
    got = results[0]
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert reference["losses"][-1] < reference["losses"][0], "training did not move the loss"
    assert set(got["grads"]) == set(reference["grads"])
    for name, want in reference["grads"].items():
        assert want.abs().max() > 0, f"{name}: zero reference gradient tests nothing"
        assert _rel(got["grads"][name], want) < 1e-5, f"gradient of {name} differs at TP={tp} SP={sp}"
    for name, want in reference["adapters"].items():
        assert _rel(got["adapters"][name], want) < 1e-4, f"{name} differs after {STEPS} steps at TP={tp} SP={sp}"
    for result in results:
        assert result["n_replicated"] > 0
        assert result["replica_diff"] == 0.0, "replicated factors drifted apart across TP ranks"


def _ranks_by_global_name() -> dict[str, int]:
    from dist_lora.naming import global_module_name

    config = LoraConfig(
        r=4, rank_pattern={"decoder.layers.1.mlp.linear_fc2": 2}, target_modules=r".*layers\.1\..*linear_(qkv|fc2)",
    )
    gpt_config = tiny_gpt_config(1, False, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, **MODEL)
    model = get_lora_model(build_tiny_gpt(gpt_config), config)
    return {global_module_name(model.model, n): layer.r["default"] for n, layer in model.lora_layers()}


def test_pipeline_stages_match_patterns_on_global_layer_names() -> None:
    """Stage 1 of PP=2 numbers its only layer 0 locally; rank_pattern and a regex
    target_modules written for global layer 1 must still apply to it (and only to it)."""
    stage0, stage1 = run_distributed(_ranks_by_global_name, 2, pp=2)
    assert stage0 == {}, "stage 0 holds layer 0, which the regex does not target"
    assert stage1 == {"decoder.layers.1.self_attention.linear_qkv": 4, "decoder.layers.1.mlp.linear_fc2": 2}
