"""CorDA initialisation: parity with PEFT (unsharded), TP/SP/DP layout invariance on megatron,
files, and refusals.

Tolerances: on an HF model dist_lora runs PEFT's own fp32 calls, so products and residual
weights agree to 1e-6. Megatron layers take the fp64 Gram-eigh path at every TP size; against
a dense fp64 SVD reference written here from the formula, and across TP sizes, they agree to
~1e-6 relative on these fp32 weights; we check 1e-5 (kpm's small singular values included).
"""

from __future__ import annotations

import os

import peft
import pytest
import torch

from dist_lora import ConfigError, CordaConfig, LoraConfig, get_lora_model
from dist_lora.init import preprocess_corda
from dist_lora.layers import LoraLayer
from tests import hf_models
from tests.harness import run_distributed

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(n: int = 4, seq: int = 12) -> list[torch.Tensor]:
    return [torch.randint(hf_models.VOCAB, (1, seq), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _cfg(method: str = "ipm", targets=TARGETS, **corda) -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method, **corda),
    )


def _runner(model, batches):
    def run():
        for ids in batches:
            model(ids)

    return run


def _layers(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and "default" in m.lora_A}


def _product(layer) -> torch.Tensor:
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def _peft_corda(method: str, batches, **corda):
    from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    model = hf_models.tiny_llama()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
        corda_config=PeftCordaConfig(corda_method=method, **corda),
    )
    peft_preprocess(model, config, run_model=_runner(model, batches) if batches else None)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_matches_peft_and_keeps_the_output(method):
    batches = _batches()
    model = hf_models.tiny_llama()
    config = _cfg(method)
    preprocess_corda(model, config, run_model=_runner(model, batches))
    ours = get_lora_model(model, config, seed=0)
    theirs = _peft_corda(method, batches)
    ours_layers, their_layers = dict(ours.lora_layers()), _layers(theirs)
    assert len(ours_layers) == 6 and ours_layers.keys() == their_layers.keys()
    for name, layer in ours_layers.items():
        other = their_layers[name]
        assert _product(layer).abs().max() > 1e-3  # a real split of W
        torch.testing.assert_close(_product(layer), _product(other), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_weight, other.base_layer.weight, atol=1e-6, rtol=0)
        assert not hasattr(layer.base_layer, "corda_eigens")  # used up, as PEFT does
    ids = hf_models.sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_models.tiny_llama()(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_files_round_trip_and_peft_reads_our_cache(tmp_path, suffix):
    batches = _batches()
    cache, cov = str(tmp_path / f"cache{suffix}"), str(tmp_path / f"cov{suffix}")
    model = hf_models.tiny_llama()
    config = _cfg("kpm", cache_file=cache, covariance_file=cov)
    preprocess_corda(model, config, run_model=_runner(model, batches))
    first = {n: _product(l).detach().clone() for n, l in get_lora_model(model, config, seed=0).lora_layers()}
    assert os.path.getsize(cache) > 0 and os.path.getsize(cov) > 0

    from_cache = hf_models.tiny_llama()  # no data pass: everything from the cache
    preprocess_corda(from_cache, config)
    from_cov = hf_models.tiny_llama()  # from the covariances only
    preprocess_corda(from_cov, _cfg("kpm", covariance_file=cov))
    for other in (from_cache, from_cov):
        got = {n: _product(l) for n, l in get_lora_model(other, config, seed=0).lora_layers()}
        for name in first:
            torch.testing.assert_close(got[name], first[name], atol=1e-6, rtol=0)
    if suffix == ".pt":  # PEFT's own cache format: PEFT builds the same adapters from our file
        theirs = _layers(_peft_corda("kpm", None, cache_file=cache))
        for name in first:
            torch.testing.assert_close(_product(theirs[name]), first[name], atol=1e-6, rtol=0)


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[n], p) for n, p in model.named_parameters()) and not any(
        isinstance(m, LoraLayer) for m in model.modules()
    )


def test_without_data_pass_is_refused():
    model = hf_models.tiny_llama()
    with pytest.raises(ValueError, match="CorDA needs a data pass"):
        preprocess_corda(model, _cfg())
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="run dist_lora.init.preprocess_corda"):
        get_lora_model(model, _cfg(), seed=0)
    assert _unchanged(model, before)


def test_partly_prepared_model_is_refused_before_any_change():
    batches = _batches(2)
    model = hf_models.tiny_llama()
    preprocess_corda(model, _cfg(targets=["q_proj"]), run_model=_runner(model, batches))  # v_proj not prepared
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="v_proj' has no CorDA data"):
        get_lora_model(model, _cfg(targets=["q_proj", "v_proj"]), seed=0)
    assert _unchanged(model, before)
    with pytest.raises(ValueError, match=r"CorDA u has shape \(32, 4\), expected \(32, 2\)"):
        get_lora_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="corda"), seed=0)
    assert _unchanged(model, before)


def test_bad_corda_method():
    with pytest.raises(ConfigError, match="corda_method must be 'ipm' or 'kpm'"):
        CordaConfig(corda_method="svd")
    config = _cfg()
    config.corda_config.corda_method = "svd"  # set after validation
    model = hf_models.tiny_llama()
    with pytest.raises(ConfigError, match="corda_method must be 'ipm' or 'kpm'"):
        preprocess_corda(model, config, run_model=_runner(model, _batches(1)))


class _NotATensor:
    pass


@pytest.mark.parametrize("kind", ["garbage", "pickle", "shape", "nan"])
def test_bad_covariance_file_is_refused_before_any_change(tmp_path, kind):
    path = str(tmp_path / "cov.pt")
    good = {f"model.layers.{i}.{m}": torch.eye(n) for i in range(2) for m, n in [("self_attn.q_proj", 32), ("self_attn.v_proj", 32), ("mlp.down_proj", 64)]}
    if kind == "garbage":
        with open(path, "wb") as f:
            f.write(b"\x00not a tensor file" * 10)
    elif kind == "pickle":  # arbitrary objects: torch.load(weights_only=True) refuses them
        torch.save({"x": _NotATensor()}, path)
    elif kind == "shape":
        good["model.layers.1.mlp.down_proj"] = torch.eye(32)
        torch.save(good, path)
    else:
        good["model.layers.0.self_attn.v_proj"][0, 0] = float("nan")
        torch.save(good, path)
    message = {"garbage": "could not be read", "pickle": "could not be read", "shape": r"has shape \(32, 32\), expected \(64, 64\)", "nan": "NaN"}[kind]
    model = hf_models.tiny_llama()
    with pytest.raises(ValueError, match=message):
        preprocess_corda(model, _cfg(covariance_file=path))
    assert not any(hasattr(m, "corda_eigens") for m in model.modules())


# --- megatron: TP / SP / DP layout invariance ---------------------------------------------------


def _dense_reference(w: torch.Tensor, c: torch.Tensor, r: int, method: str) -> torch.Tensor:
    """s·B·A = U_r S_r Vh_r Ĉ⁻¹ for W Ĉ = U S Vh (fp64), with PEFT's damping rule."""
    c32, eye = c.float(), torch.eye(c.shape[0])
    damp = 0.01
    while torch.dist((c32 + eye * c32.diag().mean() * damp) @ torch.linalg.inv(c32 + eye * c32.diag().mean() * damp), eye) >= 0.05:
        damp *= 2
    c64 = c.double()
    fixed = c64 + torch.eye(c.shape[0], dtype=torch.float64) * c64.diag().mean() * damp
    u, s, vh = torch.linalg.svd(w.double() @ fixed, full_matrices=False)
    sl = slice(0, r) if method == "ipm" else slice(s.shape[0] - r, s.shape[0])
    return (u[:, sl] * s[sl]) @ vh[sl] @ torch.linalg.inv(fixed)


def _gpt_corda(method: str, sp: bool, cov_dir: str, cache_file: str | None = None, run_data: bool = True):
    from megatron.core import parallel_state as ps

    from tests.models import build_tiny_gpt, random_batch, tiny_gpt_config
    from tests.tp_utils import gather_param, gathered_adapters

    tp, dp, dp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    torch.manual_seed(0)
    base = build_tiny_gpt(tiny_gpt_config(tp, sp, num_attention_heads=8, num_query_groups=4))
    tokens, _ = random_batch(0)
    with torch.no_grad():
        expected = base(tokens, position_ids=None, attention_mask=None)
    originals = {n.removesuffix(".weight"): gather_param(p) for n, p in base.named_parameters() if n.endswith("weight")}
    batches = [random_batch(10 + i)[0] for i in range(4)][dp_rank::dp]  # DP ranks see different data

    def run():
        for ids in batches:
            base(ids, position_ids=None, attention_mask=None)

    cov_file = os.path.join(cov_dir, f"cov_tp{tp}_dp{dp}_{method}_{sp}.safetensors")
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="corda", rank_pattern={"linear_fc2": 2},
        corda_config=CordaConfig(corda_method=method, covariance_file=cov_file, cache_file=cache_file),
    )
    preprocess_corda(base, config, run_model=run if run_data else None)
    model = get_lora_model(base, config, seed=0)
    with torch.no_grad():
        got = model(tokens, position_ids=None, attention_mask=None)
    products, weights, replicated_equal = gathered_adapters(model)
    return dict(
        originals=originals, products=products, weights=weights, replicated_equal=replicated_equal,
        output_diff=float((got - expected).abs().max()), cov_file=cov_file,
    )


def _check_against(results: list, ref: dict) -> None:
    for rank, res in enumerate(results):
        assert res["replicated_equal"], rank
        assert res["output_diff"] < 1e-4, rank
        assert res["products"].keys() == ref["products"].keys()
        for name in ref["products"]:
            torch.testing.assert_close(res["products"][name], ref["products"][name], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(res["weights"][name], ref["weights"][name], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def cov_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corda_cov"))


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_megatron_tp2_equals_tp1_and_the_formula(method, cov_dir):
    from safetensors.torch import load_file

    ref = run_distributed(_gpt_corda, 1, tp=1, args=(method, False, cov_dir))[0]
    covs = load_file(ref["cov_file"])
    assert len(ref["products"]) == 8  # qkv, proj, fc1, fc2 in two layers
    for name, product in ref["products"].items():
        w = ref["originals"][name]
        r = 2 if "linear_fc2" in name else 4
        exact = _dense_reference(w, covs[name], r, method).float()
        torch.testing.assert_close(product, exact, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref["weights"][name] + product, w, atol=1e-5, rtol=0)
    assert ref["output_diff"] < 1e-4
    _check_against(run_distributed(_gpt_corda, 2, tp=2, args=(method, False, cov_dir)), ref)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_megatron_tp4_sp_and_dp_equal_tp1(method, cov_dir):
    ref = run_distributed(_gpt_corda, 1, tp=1, args=(method, False, cov_dir))[0]
    _check_against(run_distributed(_gpt_corda, 4, tp=4, args=(method, False, cov_dir)), ref)
    _check_against(run_distributed(_gpt_corda, 2, tp=2, args=(method, True, cov_dir)), ref)  # sequence parallel
    _check_against(run_distributed(_gpt_corda, 4, tp=2, args=(method, False, cov_dir)), ref)  # TP=2 x DP=2


def test_megatron_sequence_parallel_and_data_parallel_equal_tp1(cov_dir):
    ref = run_distributed(_gpt_corda, 1, tp=1, args=("ipm", False, cov_dir))[0]
    _check_against(run_distributed(_gpt_corda, 4, tp=2, args=("ipm", True, cov_dir)), ref)  # TP=2 x DP=2, SP on


def test_megatron_cache_written_at_tp2_loads_at_tp1_and_tp4(cov_dir):
    cache = os.path.join(cov_dir, "cache_tp2.pt")
    written = run_distributed(_gpt_corda, 2, tp=2, args=("kpm", False, cov_dir, cache))
    assert os.path.getsize(cache) > 0
    ref = written[0]
    for tp in (1, 4):  # no data pass: the full U/S/V from the file, sliced to each layout
        _check_against(run_distributed(_gpt_corda, tp, tp=tp, args=("kpm", False, cov_dir, cache, False)), ref)


def test_hooked_model_supplies_the_inputs():
    batches = _batches(3)
    direct = hf_models.tiny_llama()
    preprocess_corda(direct, _cfg(), run_model=_runner(direct, batches))
    expected = {n: _product(l).detach() for n, l in get_lora_model(direct, _cfg(), seed=0).lora_layers()}
    model, hooked = hf_models.tiny_llama(), hf_models.tiny_llama()
    preprocess_corda(model, _cfg(), run_model=_runner(hooked, batches), hooked_model=hooked)
    got = {n: _product(l) for n, l in get_lora_model(model, _cfg(), seed=0).lora_layers()}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


def test_failing_data_pass_leaves_no_hooks_and_no_data():
    model = hf_models.tiny_llama()

    def run():
        model(_batches(1)[0])
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        preprocess_corda(model, _cfg(), run_model=run)
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(hasattr(m, "corda_eigens") for m in model.modules())


def test_half_precision_covariance_matches_peft():
    batches = _batches()
    model = hf_models.tiny_llama().to(torch.bfloat16)
    config = _cfg("ipm", use_float16_for_covariance=True)
    preprocess_corda(model, config, run_model=_runner(model, batches))
    ours = dict(get_lora_model(model, config, seed=0).lora_layers())

    from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    other = hf_models.tiny_llama().to(torch.bfloat16)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                                  corda_config=PeftCordaConfig(corda_method="ipm", use_float16_for_covariance=True))
    peft_preprocess(other, peft_config, run_model=_runner(other, batches))
    theirs = _layers(peft.get_peft_model(other, peft_config))
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for name, layer in ours.items():
        assert layer.base_weight.dtype == torch.bfloat16
        assert torch.equal(layer.base_weight, theirs[name].base_layer.weight)  # W - s·B·A from fp32 factors
        # PEFT moves the new factors to the base layer's dtype (bf16) and then back to fp32, so
        # its adapters are our fp32 factors rounded to bf16; dist_lora keeps them in fp32.
        for factor in ("lora_A", "lora_B"):
            mine, peft_factor = getattr(layer, factor)["default"].weight, getattr(theirs[name], factor)["default"].weight
            assert mine.dtype == peft_factor.dtype == torch.float32
            assert torch.equal(mine.to(torch.bfloat16).float(), peft_factor)


def test_cache_built_for_another_rank_is_refused(tmp_path):
    cache = str(tmp_path / "cache.pt")
    model = hf_models.tiny_llama()
    preprocess_corda(model, _cfg(cache_file=cache), run_model=_runner(model, _batches(2)))
    other = hf_models.tiny_llama()
    config = LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="corda", corda_config=CordaConfig(cache_file=cache))
    with pytest.raises(ValueError, match=r"U_WC' has shape \(32, 4\), expected \(32, 2\)"):
        preprocess_corda(other, config)
    assert not any(hasattr(m, "corda_eigens") for m in other.modules())


def test_trained_corda_adapter_converts_for_the_original_model_with_peft(tmp_path):
    """save_pretrained(path_initial_model_for_weight_conversion=...) turns a CorDA adapter into
    a plain rank-2r one for the ORIGINAL weights; PEFT's logits equal the trained model's."""
    model = hf_models.tiny_llama()
    config = _cfg("ipm")
    preprocess_corda(model, config, run_model=_runner(model, _batches(2)))
    ours = get_lora_model(model, config, seed=0)
    ours.save_pretrained(tmp_path / "initial")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training
        for _, layer in ours.lora_layers():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ids = hf_models.sample_ids()
    with torch.no_grad():
        expected = ours(ids).logits
    ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "initial")
    theirs = peft.PeftModel.from_pretrained(hf_models.tiny_llama(), tmp_path / "out")
    theirs.eval()
    with torch.no_grad():
        got = theirs(ids).logits
        assert (expected - hf_models.tiny_llama()(ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_conv1d_matches_peft():
    """GPT-2's Conv1D ([in, out] weights)."""
    from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    batches = _batches(3)
    model = hf_models.tiny_gpt2()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
    preprocess_corda(model, config, run_model=_runner(model, batches))
    ours = dict(get_lora_model(model, config, seed=0).lora_layers())
    other = hf_models.tiny_gpt2()
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                  init_lora_weights="corda", corda_config=PeftCordaConfig(corda_method="kpm"))
    peft_preprocess(other, peft_config, run_model=_runner(other, batches))
    theirs = _layers(peft.get_peft_model(other, peft_config))
    assert ours.keys() == theirs.keys() and len(ours) >= 4
    for name, layer in ours.items():
        torch.testing.assert_close(_product(layer), _product(theirs[name]), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_weight, theirs[name].base_layer.weight, atol=1e-6, rtol=0)
