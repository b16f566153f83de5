"""LoRA on mixture-of-experts layers is layout-invariant: the same losses, gathered adapter
gradients (and their global norm) and adapters after 3 AdamW steps at (EP, TP) = (2, 1), (1, 2), (2, 2) — SP on where
TP > 1, expert-TP 1 with the all-to-all dispatcher — and at expert-TP = TP = 2 with the
all-gather dispatcher, as at (1, 1); per-expert adapters, one adapter shared by the experts of
a layer, and a router LoRA. Routing is checked identical (the top-k routing map of every layer
and token) and every expert gets tokens, so the experts' adapters really see different tokens.

The base model is the same at every layout (:func:`tests.models.fill_weights_by_global_name`).
Data parallelism: at (2, 1) the two ranks are DP ranks with the same batch, so the DP average
must change nothing (dense adapters averaged over DP, expert ones summed over expert-DP / DP).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from dist_lora import LoraConfig, get_lora_model
from dist_lora.config import LoraRuntimeConfig
from dist_lora.naming import global_module_name
from dist_lora.parallel import tp
from dist_lora.parallel.grads import allreduce_data_parallel_grads, clip_grad_norm_, finalize_lora_grads
from tests.harness import run_distributed
from tests.models import build_tiny_gpt, fill_weights_by_global_name, gpt_loss, moe_config, random_batch

EXPERT_TARGETS = ["linear_fc1", "linear_fc2"]  # every expert's (the MoE layers have no dense MLP)
LAYOUTS = [  # (EP, TP, expert-TP, dispatcher)
    (2, 1, 1, "alltoall"),
    (1, 2, 1, "alltoall"),
    (2, 2, 1, "alltoall"),
    (1, 2, 2, "allgather"),
    (1, 1, 2, "allgather"),
    (2, 2, 2, "allgather"),
]


def gathered_adapters(model, what: str) -> dict[str, torch.Tensor]:
    """Every adapter factor (``what``: "grad" or "value") as its full tensor, by global name,
    gathered over (expert-)TP and from every EP rank (collective: every rank calls it)."""
    local = {}
    for name, layer in model.lora_layers():
        key = global_module_name(model.model, name)
        for store in ("lora_A", "lora_B"):
            param = getattr(layer, store)["default"].weight
            value = (param.grad if what == "grad" else param).detach()
            if getattr(param, "tensor_model_parallel", False):
                value = tp.gather_full(value, param.partition_dim, layer.tp_group, tp.partition_stride(param))
            local[f"{key}.{store}"] = value.clone()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return {k: v for part in everyone for k, v in part.items()}


def _routing_recorder(model) -> list:
    """Forward hooks that keep each router's routing map ([tokens, experts], sequence-gathered)."""
    maps: list = []

    def hook(module, args, output):
        routing_map = output[1].detach()
        group = parallel_state.get_tensor_model_parallel_group()
        if module.config.sequence_parallel and dist.get_world_size(group) > 1:
            parts = [torch.empty_like(routing_map) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, routing_map.contiguous(), group=group)
            routing_map = torch.cat(parts)
        maps.append(routing_map.clone())

    for name, module in model.named_modules():
        if type(module).__name__ == "TopKRouter":
            module.register_forward_hook(hook)
    return maps


def _train(ep: int, tp_size: int, etp: int, dispatcher: str, targets: list, expert_adapters: str) -> dict:
    model = build_tiny_gpt(moe_config(tp_size, ep, etp, dispatcher))
    fill_weights_by_global_name(model)
    maps = _routing_recorder(model)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
        runtime_config=LoraRuntimeConfig(expert_adapters=expert_adapters),
    )
    lora = get_lora_model(model, config, seed=7)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    out = {"losses": []}
    for step in range(3):
        loss = gpt_loss(lora, *random_batch(100 + step))
        optimizer.zero_grad()
        loss.backward()
        finalize_lora_grads(lora)
        allreduce_data_parallel_grads(lora)
        if step == 0:
            out["grads"] = gathered_adapters(lora, "grad")
            out["norm"] = clip_grad_norm_(lora, None)  # the global norm over every rank's adapters
            out["routing"] = [m.clone() for m in maps]
        optimizer.step()
        out["losses"].append(loss.item())
    out["adapters"] = gathered_adapters(lora, "value")
    return out


def _assert_same(got: dict, want: dict) -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-5, atol=1e-6)
    assert got["norm"] == pytest.approx(want["norm"], rel=1e-5)
    assert len(got["routing"]) == len(want["routing"])
    for g, w in zip(got["routing"], want["routing"]):
        assert torch.equal(g, w), "the routing differs from the (1, 1) model's"
    # Relative to the tensor's largest value. Step-0 gradients agree to ~1e-6 (fp32 rounding of a
    # different summation order); AdamW's normalised steps amplify that to up to ~3e-4 in the
    # adapters after 3 steps (measured: attention B with a router LoRA, even at TP = 1, EP = 1,
    # expert-TP = 2, where only the experts' summation order differs). A wrong reduction or seed
    # gives errors of order 1.
    for part, tolerance in (("grads", 1e-5), ("adapters", 1e-3)):
        assert got[part].keys() == want[part].keys()
        for key, value in want[part].items():
            error = (got[part][key] - value).abs().max().item() / max(value.abs().max().item(), 1e-12)
            assert error < tolerance, f"{part} {key}: relative error {error:.2e}"


CASES = {
    "per_expert": (EXPERT_TARGETS, "per_expert"),
    "shared": (EXPERT_TARGETS, "shared"),
    "router_and_attention": (["router", "linear_qkv", "linear_fc2"], "per_expert"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_lora_is_layout_invariant(case: str) -> None:
    targets, expert_adapters = CASES[case]
    reference = run_distributed(_train, 1, args=(1, 1, 1, "alltoall", targets, expert_adapters))[0]
    for routing_map in reference["routing"]:  # 2 layers x 3 steps; every expert must get tokens
        assert (routing_map.sum(0) > 0).all(), f"an expert got no token: {routing_map.sum(0).tolist()}"
    experts = {k for k in reference["grads"] if ".local_experts." in k}
    if case != "router_and_attention":
        assert len(experts) == 2 * 4 * 2 * 2  # layers x experts x (fc1, fc2) x (A, B)
        assert all(reference["grads"][k].abs().sum() > 0 for k in experts)
    for ep, tp_size, etp, dispatcher in LAYOUTS:
        results = run_distributed(
            _train, ep * max(tp_size, etp), args=(ep, tp_size, etp, dispatcher, targets, expert_adapters), tp=tp_size, ep=ep, etp=etp
        )
        for result in results:
            _assert_same(result, reference)


def _expert_names() -> list:
    from dist_lora.naming import local_module_name

    model = build_tiny_gpt(moe_config(1, 2))
    out = []
    for name, _ in model.named_modules():
        if name.endswith("local_experts.1.linear_fc2"):
            global_name = global_module_name(model, name)
            out.append((name, global_name, local_module_name(model, global_name)))
    out.append(("other rank's expert", local_module_name(model, "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2" if
                                                          parallel_state.get_expert_model_parallel_rank() else
                                                          "decoder.layers.0.mlp.experts.local_experts.2.linear_fc2")))
    return out


def test_expert_names_use_global_expert_indices() -> None:
    rank0, rank1 = run_distributed(_expert_names, 2, ep=2, etp=1)
    assert rank0[0] == ("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2",) * 3
    assert rank1[0] == ("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2",
                        "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2",
                        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2")
    assert rank0[-1][1] is None and rank1[-1][1] is None  # held by the other EP rank


def _dora_on_experts_at_expert_tp2() -> tuple[str, int]:
    model = build_tiny_gpt(moe_config(2, 1, 2, "allgather"))
    before = sorted(n for n, _ in model.named_parameters())
    try:
        get_lora_model(model, LoraConfig(r=4, target_modules=EXPERT_TARGETS, use_dora=True), seed=7)
    except NotImplementedError as e:
        assert sorted(n for n, _ in model.named_parameters()) == before, "the refused adapter left modules behind"
        return str(e), sum(p.requires_grad for p in model.parameters())
    return "", 0


def test_dora_on_experts_at_expert_tp2_is_refused_model_untouched() -> None:
    for message, trainable in run_distributed(_dora_on_experts_at_expert_tp2, 2, tp=2, etp=2):
        assert "use_dora and lora_bias are not supported on MoE experts at expert-TP > 1" in message
        assert trainable > 0  # unfrozen again


def _merged_losses() -> tuple[float, float, float]:
    model = build_tiny_gpt(moe_config(1, 1))
    fill_weights_by_global_name(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["router", "linear_fc1"], init_lora_weights=False)
    lora = get_lora_model(model, config, seed=7)
    batch = random_batch(3)
    with torch.no_grad():
        adapted = gpt_loss(lora, *batch).item()
        lora.merge_adapter()
        merged = gpt_loss(lora, *batch).item()
        lora.unmerge_adapter()
        with lora.disable_adapter():
            base = gpt_loss(lora, *batch).item()
    return adapted, merged, base


def test_router_and_expert_adapters_merge_into_the_base_weights() -> None:
    adapted, merged, base = run_distributed(_merged_losses, 1)[0]
    assert merged == pytest.approx(adapted, rel=1e-5)
    assert abs(adapted - base) > 1e-3, "the adapters changed nothing: the merge check tests nothing"
