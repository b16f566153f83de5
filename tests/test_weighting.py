"""add_weighted_adapter: PEFT's combination types, exact where the math allows, the same
result at every TP size (DARE masks included), and clear errors for bad input.

References: the dense weighted sum Σ w_i s_i B_i A_i (for the exact types), real PEFT 0.21 on
the same weights (for the types where PEFT is right: non-rsLoRA sources), and the TP=1 run.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from dist_lora import LoraConfig, LoraModel, get_lora_model
from dist_lora.weighting import COMBINATION_TYPES, SVD_TYPES, random_prune_tensor
from tests import hf_models
from tests.harness import run_distributed

TARGETS = ["q_proj", "v_proj"]
W = [0.7, -1.3]


def _llama_model(rslora: bool = False, b_config: dict | None = None) -> LoraModel:
    """Adapters 'a' (r=4, alpha=8) and 'b' (r=4, alpha=2 by default) with non-zero B."""
    model = get_lora_model(
        hf_models.tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora),
        adapter_name="a", seed=0,
    )
    b = dict(r=4, lora_alpha=2, target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora)
    model.add_adapter("b", LoraConfig(**{**b, **(b_config or {})}))
    return model


def _peft_copy(model: LoraModel):
    """Real PEFT on the same base and adapter weights (non-rsLoRA, same configs)."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = peft.get_peft_model(hf_models.tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                                adapter_name="a")
        p.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS))
    state = p.state_dict()
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            state["base_model.model." + key[len("model."):]].copy_(value)
    return p


def _dense(layer, adapters, weights) -> torch.Tensor:
    return sum(w * layer.get_delta_weight(a) for a, w in zip(adapters, weights) if a in layer.lora_A)


@pytest.mark.parametrize(
    "combination_type,kwargs",
    [("linear", {}), ("cat", {}), ("ties", dict(density=0.5)), ("ties", dict(density=0.3, majority_sign_method="frequency")),
     ("magnitude_prune", dict(density=0.6)), ("svd", dict(svd_rank=3)), ("ties_svd", dict(density=0.5)),
     ("magnitude_prune_svd", dict(density=0.5, svd_clamp=0.9))],
)
def test_matches_peft_on_plain_model(combination_type: str, kwargs: dict) -> None:
    """Same factors as PEFT (alpha != r, no rsLoRA: where PEFT is right); SVD types: same ΔW."""
    ours = _llama_model()
    theirs = _peft_copy(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(["a", "b"], W, "n", combination_type=combination_type, **kwargs)
    ours.add_weighted_adapter(["a", "b"], W, "n", combination_type=combination_type, **kwargs)
    layers = list(ours.lora_layers())
    assert len(layers) == 4
    for name, layer in layers:
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert layer.scaling["n"] == peft_layer.scaling["n"] == 1.0
        if combination_type in SVD_TYPES:
            torch.testing.assert_close(layer.get_delta_weight("n"), peft_layer.get_delta_weight("n"), atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(layer.lora_A["n"].weight, peft_layer.lora_A["n"].weight, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(layer.lora_B["n"].weight, peft_layer.lora_B["n"].weight, atol=1e-6, rtol=1e-5)
    assert ours.active_adapters == ["a"] and not any(
        p.requires_grad for n, p in ours.named_parameters() if ".n." in n
    ), "the new adapter is added frozen and inactive, as in PEFT"


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("combination_type", ["cat", "svd", "dare_linear_svd"])
def test_exact_types_equal_dense_weighted_sum(rslora: bool, combination_type: str) -> None:
    """cat, and SVD with svd_rank >= rank of the sum (DARE at density 1 prunes nothing), give
    exactly Σ w_i ΔW_i with alpha != r, with rsLoRA, with different ranks and target sets."""
    model = _llama_model(rslora, b_config=dict(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj"],
                                               rank_pattern={"q_proj": 3}))
    kwargs = {} if combination_type == "cat" else dict(svd_rank=7, density=1.0)
    model.add_weighted_adapter(["a", "b"], W, "n", combination_type=combination_type, **kwargs)
    names = {name.rsplit(".", 1)[1] for name, layer in model.lora_layers() if "n" in layer.lora_A}
    assert names == {"q_proj", "k_proj", "v_proj"}
    for name, layer in model.lora_layers():
        want = _dense(layer, ["a", "b"], W)
        assert layer.r["n"] == 7 and layer.scaling["n"] == 1.0  # cat: 4 + max(2, 3); svd: svd_rank
        torch.testing.assert_close(layer.get_delta_weight("n"), want, atol=1e-5, rtol=1e-5)
    config = model.peft_config["n"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (7, 7, False)
    assert sorted(config.target_modules) == ["k_proj", "q_proj", "v_proj"]


def test_svd_rank_truncates_to_best_low_rank_approximation() -> None:
    model = _llama_model()
    model.add_weighted_adapter(["a", "b"], W, "n", combination_type="svd", svd_rank=2, svd_full_matrices=False)
    for _, layer in model.lora_layers():
        want = _dense(layer, ["a", "b"], W)
        u, s, vh = torch.linalg.svd(want)
        assert layer.r["n"] == 2
        torch.testing.assert_close(layer.get_delta_weight("n"), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)


def test_single_source_is_exact_linear_and_rank_pattern_round_trips_through_peft(tmp_path) -> None:
    """One source: every type is 'linear' (as PEFT), exact even with rsLoRA; the new adapter's
    config (alpha = r per module, rank_pattern kept) loads in real PEFT with the same ΔW."""
    import peft

    model = get_lora_model(
        hf_models.tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_rslora=True,
                   rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5}),
        adapter_name="a", seed=0,
    )
    model.add_weighted_adapter(["a"], [-0.5], "n", combination_type="ties_svd", density=0.2)
    for _, layer in model.lora_layers():
        torch.testing.assert_close(layer.get_delta_weight("n"), -0.5 * layer.get_delta_weight("a"), atol=1e-6, rtol=1e-5)
    model.save_pretrained(tmp_path, selected_adapters=["n"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(hf_models.tiny_llama(), os.path.join(tmp_path, "n"))
    for name, layer in model.lora_layers():
        theirs = loaded.base_model.model.get_submodule(name)
        torch.testing.assert_close(theirs.get_delta_weight("default"), layer.get_delta_weight("n"), atol=1e-6, rtol=1e-5)


def test_dare_prune_keeps_density_fraction_rescaled_and_is_seeded() -> None:
    t = torch.randn(200, 300)
    out = random_prune_tensor(t, 0.3, torch.Generator().manual_seed(5))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(out[kept], t[kept] / 0.3)
    assert torch.equal(out, random_prune_tensor(t, 0.3, torch.Generator().manual_seed(5)))
    assert torch.equal(random_prune_tensor(t, 0.0, torch.Generator()), torch.zeros_like(t))
    assert torch.equal(random_prune_tensor(t, 1.0, torch.Generator()), t)


def test_dare_masks_come_from_the_seed_not_the_global_rng() -> None:
    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        model = _llama_model()
        model.add_weighted_adapter(["a", "b"], W, "n", combination_type="dare_ties", density=0.5, seed=seed)
        return [layer.lora_A["n"].weight.clone() for _, layer in model.lora_layers()]

    first, again, other = run(3, 0), run(3, 99), run(4, 0)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_bad_input_gives_clear_errors() -> None:
    model = _llama_model(b_config=dict(r=2))
    cases = [
        (dict(combination_type="average"), "unknown combination_type 'average'"),
        (dict(combination_type="ties", density=1.5), r"density must be a number in \[0, 1\]"),
        (dict(combination_type="dare_linear", density=-0.1), r"density must be a number in \[0, 1\]"),
        (dict(combination_type="ties"), "needs density"),
        (dict(combination_type="linear"), "same rank"),
        (dict(combination_type="svd", svd_rank=0), "svd_rank must be an integer >= 1"),
        (dict(combination_type="svd", svd_clamp=2.0), "svd_clamp must be a quantile"),
        (dict(combination_type="svd", svd_driver="magic"), "svd_driver must be one of"),
        (dict(combination_type="ties", density=0.5, majority_sign_method="vote"), "majority_sign_method"),
        (dict(adapters=["a", "zzz"]), r"unknown adapter\(s\) \['zzz'\]"),
        (dict(weights=[1.0]), "got 1 weights for 2 adapters"),
        (dict(adapter_name="a"), "already exists"),
    ]
    for kwargs, message in cases:
        args = dict(adapters=["a", "b"], weights=W, adapter_name="n") | kwargs
        with pytest.raises(ValueError, match=message):
            model.add_weighted_adapter(**args)
    other_targets = _llama_model(b_config=dict(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="same modules"):
        other_targets.add_weighted_adapter(["a", "b"], W, "n", combination_type="linear")
    assert "n" not in model.peft_config and "n" not in other_targets.peft_config
    assert all("n" not in layer.lora_A for m in (model, other_targets) for _, layer in m.lora_layers())


# --- tensor parallel: the same new adapter at TP=1, 2 and 4 -----------------------------------

MODEL = dict(num_attention_heads=8, num_query_groups=4)
TP_CASES = {
    "svd": dict(svd_rank=8), "linear": {}, "cat": {}, "ties": dict(density=0.5),
    "ties_svd": dict(density=0.5, majority_sign_method="frequency"), "dare_ties": dict(density=0.6),
    "dare_linear": dict(density=0.4), "dare_ties_svd": dict(density=0.5, svd_clamp=0.95),
    "dare_linear_svd": dict(density=0.7), "magnitude_prune": dict(density=0.5), "magnitude_prune_svd": dict(density=0.5),
}


def _combine_on_gpt() -> dict:
    from megatron.core import parallel_state

    from tests.models import build_tiny_gpt, tiny_gpt_config
    from tests.tp_utils import all_tp_copies, gather_param

    tp = parallel_state.get_tensor_model_parallel_world_size()
    targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    model = get_lora_model(
        build_tiny_gpt(tiny_gpt_config(tp, False, **MODEL)),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), adapter_name="a", seed=0,
    )
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=targets, init_lora_weights=False))
    out, replica_diff = {}, 0.0
    for combination_type, kwargs in TP_CASES.items():
        name = f"n_{combination_type}"
        model.add_weighted_adapter(["a", "b"], W, name, combination_type=combination_type, **kwargs)
        for module, layer in model.lora_layers():
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            for p in (a, b):
                if not getattr(p, "tensor_model_parallel", False):
                    replica_diff = max(replica_diff, max((c - p).abs().max().item() for c in all_tp_copies(p.detach())))
            full_a, full_b = gather_param(a), gather_param(b)
            out[(combination_type, module)] = (full_a, full_b, layer.scaling[name] * full_b @ full_a)
        if combination_type in ("cat", "svd"):  # exact types: also the dense weighted sum, gathered
            for module, layer in model.lora_layers():
                dense = sum(w * layer.scaling[s] * gather_param(layer.lora_B[s].weight) @ gather_param(layer.lora_A[s].weight)
                            for s, w in zip(["a", "b"], W))
                out[("dense", module)] = dense
    out["replica_diff"] = replica_diff
    return out


@pytest.fixture(scope="module")
def tp1() -> dict:
    return run_distributed(_combine_on_gpt, 1, tp=1)[0]


def test_tp1_exact_types_on_megatron(tp1: dict) -> None:
    for key, dense in tp1.items():
        if key != "replica_diff" and key[0] == "dense":
            for combination_type in ("cat", "svd"):
                torch.testing.assert_close(tp1[(combination_type, key[1])][2], dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_every_combination_type_is_layout_invariant(tp1: dict, tp: int) -> None:
    results = run_distributed(_combine_on_gpt, tp, tp=tp)
    got = results[0]
    assert set(got) == set(tp1)
    assert {k[0] for k in tp1 if k != "replica_diff"} == set(COMBINATION_TYPES) | {"dense"}
    for key, want in tp1.items():
        if key == "replica_diff":
            continue
        if key[0] == "dense":
            torch.testing.assert_close(got[key], want, atol=1e-6, rtol=1e-6)
            continue
        full_a, full_b, delta = got[key]
        assert delta.abs().max() > 0, f"{key}: an all-zero result tests nothing"
        torch.testing.assert_close(delta, want[2], atol=1e-5, rtol=1e-4, msg=f"ΔW of {key} differs at TP={tp}")
        if key[0] not in SVD_TYPES:  # SVD factors are only defined up to sign; ΔW is checked
            torch.testing.assert_close(full_a, want[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(full_b, want[1], atol=1e-6, rtol=1e-5)
    assert all(r["replica_diff"] == 0.0 for r in results), "replicated factors differ across TP ranks"
