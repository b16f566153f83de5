"""Weight-driven inits (PiSSA, pissa_niter_<N>, OLoRA) on unsharded layers.

Tolerances: the dist_lora and PEFT factors come from the same fp32 LAPACK SVD / QR of the
same weights, so the sign-free products s·B·A and the residual weights agree to ~1e-6;
we check 1e-5. The model output at init (W - s·B·A + s·B·A x) equals the base model's to
fp32 rounding (1e-5). Tensor-parallel layers (TP > 1) refuse these inits for now.
"""

from __future__ import annotations

import peft
import pytest
import torch

from dist_lora import LoraConfig, get_lora_model
from dist_lora.factors import weight_driven_factors
from dist_lora.layers import LoraLayer
from tests import hf_models
from tests.harness import run_distributed

TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "olora", "pissa_niter_0", "pissa_niter_2"]


def _ids() -> torch.Tensor:
    return torch.randint(hf_models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _cfg(init, **kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **kw)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_output_at_init_equals_base(init, use_rslora):
    base = hf_models.tiny_llama()
    ids = _ids()
    with torch.no_grad():
        expected = base(ids).logits
    model = get_lora_model(hf_models.tiny_llama(), _cfg(init, use_rslora=use_rslora), seed=0)
    layers = dict(model.lora_layers())
    assert layers
    for layer in layers.values():
        delta = layer.get_delta_weight("default")
        assert delta.abs().max() > 1e-3  # the adapter is not zero: W was really split
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_pissa_niter_is_reproducible():
    w1 = [l.lora_A["default"].weight for _, l in get_lora_model(hf_models.tiny_llama(), _cfg("pissa_niter_1"), seed=3).lora_layers()]
    w2 = [l.lora_A["default"].weight for _, l in get_lora_model(hf_models.tiny_llama(), _cfg("pissa_niter_1"), seed=3).lora_layers()]
    for a, b in zip(w1, w2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft(init, use_rslora):
    ours = get_lora_model(hf_models.tiny_llama(), _cfg(init, use_rslora=use_rslora), seed=0)
    theirs = peft.get_peft_model(
        hf_models.tiny_llama(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, use_rslora=use_rslora),
    )
    their_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    our_layers = dict(ours.lora_layers())
    assert len(our_layers) == len(their_layers) > 0
    for name, layer in our_layers.items():
        key = next(k for k in their_layers if k.endswith(name.removeprefix("model.")) or name.endswith(k))
        other = their_layers[key]
        s = layer.scaling["default"]
        assert s == pytest.approx(other.scaling["default"])
        ours_ba = s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        theirs_ba = s * other.lora_B["default"].weight @ other.lora_A["default"].weight
        torch.testing.assert_close(ours_ba, theirs_ba, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_weight, other.base_layer.weight, atol=1e-5, rtol=0)
        if init == "olora":  # QR is unique up to signs LAPACK fixes: the factors themselves agree
            torch.testing.assert_close(layer.lora_A["default"].weight, other.lora_A["default"].weight, atol=1e-5, rtol=0)


def test_conv1d_pissa_output_at_init():
    base = hf_models.tiny_gpt2()
    ids = _ids()
    with torch.no_grad():
        expected = base(ids).logits
    model = get_lora_model(hf_models.tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="pissa", fan_in_fan_out=True), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_factor_formulas():
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    a, b, res = weight_driven_factors(w, 3, 0.5, "pissa")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(0.5 * b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(res + 0.5 * b @ a, w, atol=1e-5, rtol=0)
    a, b, res = weight_driven_factors(w, 3, 0.5, "olora")
    q, r = torch.linalg.qr(w)
    assert torch.equal(a, r[:3]) and torch.equal(b, q[:, :3])


def test_rank_larger_than_weight_is_refused_before_any_change():
    base = hf_models.tiny_llama()
    before = {n: p.clone() for n, p in base.named_parameters()}
    # q_proj (32x32) would be decomposed first; k_proj (16 rows) cannot take r=24
    config = LoraConfig(r=24, target_modules=["q_proj", "k_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"r <= min\(in_features, out_features\) = 16 on .*k_proj"):
        get_lora_model(base, config, seed=0)
    assert all(torch.equal(before[n], p) for n, p in base.named_parameters())
    assert not any(isinstance(m, LoraLayer) for m in base.modules())


MEGATRON_INITS = ["pissa", "olora", "pissa_niter_2"]


def _gpt_weight_init():
    """Per init: full (gathered) originals, s·B·A, updated base weights; replication and
    output-at-init checks done on the rank."""
    from megatron.core import parallel_state

    from tests.models import build_tiny_gpt, random_batch, tiny_gpt_config
    from tests.tp_utils import gather_param, gathered_adapters

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tokens, _ = random_batch(0)
    out = {}
    for init in MEGATRON_INITS:
        torch.manual_seed(0)
        base = build_tiny_gpt(tiny_gpt_config(tp, False, num_attention_heads=8, num_query_groups=4))
        with torch.no_grad():
            expected = base(tokens, position_ids=None, attention_mask=None)
        originals = {n: gather_param(p) for n, p in base.named_parameters() if n.endswith("weight")}
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, rank_pattern={"linear_fc2": 2})
        model = get_lora_model(base, config, seed=0)
        with torch.no_grad():
            got = model(tokens, position_ids=None, attention_mask=None)
        assert all(layer.tp_size == tp for _, layer in model.lora_layers())
        products, weights, replicated_equal = gathered_adapters(model)
        out[init] = dict(
            originals={n.removesuffix(".weight").replace(".base_layer", ""): w for n, w in originals.items()},
            products=products,
            weights=weights,
            replicated_equal=replicated_equal,
            output_diff=float((got - expected).abs().max()),
        )
    return out


@pytest.fixture(scope="module")
def megatron_results():
    return {tp: run_distributed(_gpt_weight_init, tp, tp=tp) for tp in (1, 2, 4)}


@pytest.mark.parametrize("init", MEGATRON_INITS)
def test_megatron_tp_equals_tp1_and_svd(megatron_results, init):
    ref = megatron_results[1][0][init]
    assert ref["products"]
    for name, product in ref["products"].items():
        w = ref["originals"][name]
        torch.testing.assert_close(ref["weights"][name] + product, w, atol=1e-5, rtol=0)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = 2 if "linear_fc2" in name else 4
        if init == "olora":  # PEFT's OLoRA: B = Q_r, A = R_r, unscaled, so s·B·A = s·Q_r R_r
            q, rr = torch.linalg.qr(w)
            exact = (8 / r) * q[:, :r] @ rr[:r]
        else:  # Gram-eigh (fp64 Gram) vs LAPACK SVD: ~1e-6 on these fp32 weights
            exact = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        torch.testing.assert_close(product, exact, atol=1e-5, rtol=0)
    assert ref["output_diff"] < 1e-4
    for tp in (2, 4):
        for rank, res in enumerate(megatron_results[tp]):
            res = res[init]
            assert res["replicated_equal"], (tp, rank)
            assert res["output_diff"] < 1e-4
            assert res["products"].keys() == ref["products"].keys()
            for name in ref["products"]:  # same algorithm, different shard-local BLAS blocking
                torch.testing.assert_close(res["products"][name], ref["products"][name], atol=1e-5, rtol=0)
                torch.testing.assert_close(res["weights"][name], ref["weights"][name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("init, use_rslora", [("pissa", False), ("olora", False), ("pissa_niter_1", True)])
def test_subtract_mutated_init_applies_to_original_model_with_peft(tmp_path, init, use_rslora):
    import json

    from peft.utils import set_peft_model_state_dict

    from dist_lora.checkpoint.conversion import converted_config

    config = _cfg(init, use_rslora=use_rslora)
    ours = get_lora_model(hf_models.tiny_llama(), config, seed=0)
    initial_dir = tmp_path / "initial"
    ours.save_pretrained(initial_dir)  # A0, B0; saved as a plain adapter (as PEFT does)
    cfg_file = initial_dir / "adapter_config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json["init_lora_weights"] = True
    cfg_file.write_text(json.dumps(cfg_json))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training"
        for _, layer in ours.lora_layers():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ids = _ids()
    with torch.no_grad():
        expected = ours(ids).logits
        assert (expected - hf_models.tiny_llama()(ids).logits).abs().max() > 1e-3  # training changed it
    trained = {k: v.clone() for k, v in ours.adapter_state_dict("default").items()}
    ours.load_adapter(initial_dir, adapter_name="initial")
    converted = ours.subtract_mutated_init(trained, "initial")
    assert converted.keys() == trained.keys()
    new_cfg = converted_config(config)
    assert new_cfg.r == 8 and new_cfg.init_lora_weights is True

    theirs = peft.get_peft_model(
        hf_models.tiny_llama(),  # the ORIGINAL base weights
        peft.LoraConfig(
            r=new_cfg.r, lora_alpha=new_cfg.lora_alpha, target_modules=TARGETS, use_rslora=use_rslora, init_lora_weights=True
        ),
    )
    result = set_peft_model_state_dict(theirs, converted)
    assert not result.unexpected_keys
    theirs.eval()
    with torch.no_grad():
        got = theirs(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
