"""LoftQ initialisation (bitsandbytes NF4): the formula, TP layout invariance on megatron,
``replace_lora_weights_loftq`` on a bitsandbytes 4-bit model, and refusals.

The reference: PEFT 0.21.2's ``loftq_init`` moves the weight to "cuda" (or "xpu")
unconditionally, so it cannot run on this CPU-only machine ("Torch not compiled with CUDA
enabled"). Its algorithm is written out below (:func:`_reference`) with the same bitsandbytes
calls (NF4, blocksize 64, compress_statistics=False, what PEFT's ``Params4bit`` quantisation
does) and torch.linalg.svd, as PEFT's ``_low_rank_decomposition``. One deliberate difference:
PEFT ignores the scaling s (B·A = (W - Q)_r, right only when lora_alpha == r); dist_lora
divides it out (s·B·A = (W - Q)_r). With lora_alpha == r both are the same, and we check
that case against PEFT's formula exactly; the s != 1 case against the corrected one.
"""

from __future__ import annotations

import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from dist_lora import LoftQConfig, LoraConfig, get_lora_model  # noqa: E402
from dist_lora.init import replace_lora_weights_loftq  # noqa: E402
from dist_lora.layers import LoraLayer  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.harness import run_distributed  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _nf4(w: torch.Tensor) -> torch.Tensor:
    q, state = BF.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False)
    return BF.dequantize_4bit(q, state)


def _reference(w: torch.Tensor, r: int, s: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, s·B·A): PEFT's loftq_init loop, with s divided out of B·A (at s = 1 these B, A are
    PEFT's L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r exactly)."""
    w = w.float()
    rest = w
    for i in range(iters):
        q = _nf4(rest)
        u, sing, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = torch.sqrt(sing[:r] / s)
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        product = s * (b @ a)
        rest = w - product
    return q, product


def _cfg(alpha=4, bits=4, iters=1, targets=TARGETS) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights="loftq",
                      loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters))


def _product(layer) -> torch.Tensor:
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


@pytest.mark.parametrize("alpha, iters", [(4, 1), (4, 3), (8, 2)])
def test_matches_the_formula_with_bitsandbytes(alpha, iters):
    originals = {n: m.weight.detach().clone() for n, m in hf_models.tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    model = get_lora_model(hf_models.tiny_llama(), _cfg(alpha, iters=iters), seed=0)
    layers = dict(model.lora_layers())
    assert len(layers) == 6
    for name, layer in layers.items():
        q, product = _reference(originals[name], 4, layer.scaling["default"], iters)
        assert torch.equal(layer.base_weight, q)  # the base is the dequantised NF4 weight, bit for bit
        torch.testing.assert_close(_product(layer), product, atol=1e-6, rtol=0)
        w = originals[name]  # LoftQ's point: Q + s·B·A is closer to W than Q alone
        assert (w - layer.base_weight - _product(layer)).norm() < 0.9 * (w - _nf4(w)).norm()


def test_peft_factors_at_unit_scaling():
    """At s = 1 the factors are PEFT's own: its _low_rank_decomposition (runs on CPU) of W - Q."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    w = hf_models.tiny_llama().model.layers[0].self_attn.q_proj.weight.detach()
    model = get_lora_model(hf_models.tiny_llama(), _cfg(alpha=4, targets=["layers.0.self_attn.q_proj"]), seed=0)
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    theirs = _low_rank_decomposition(w - _nf4(w), reduced_rank=4)
    torch.testing.assert_close(layer.lora_B["default"].weight, theirs["L"], atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight, theirs["R"], atol=1e-6, rtol=0)


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[n], p) for n, p in model.named_parameters()) and not any(
        isinstance(m, LoraLayer) for m in model.modules()
    )


@pytest.mark.parametrize("bits", [2, 8])
def test_unsupported_bit_width_is_refused(bits):
    model = hf_models.tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"supports loftq_bits=4 \(bitsandbytes NF4\) only"):
        get_lora_model(model, _cfg(bits=bits), seed=0)
    assert _unchanged(model, before)


def test_without_bitsandbytes_says_how_to_install(monkeypatch):
    # No honest alternative on one interpreter: bitsandbytes is installed here, so its absence
    # is simulated by making its import fail (None in sys.modules), not by mocking dist_lora.
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.setitem(sys.modules, name, None)
    model = hf_models.tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ImportError, match=r"pip install bitsandbytes==0\.50\.2"):
        get_lora_model(model, _cfg(), seed=0)
    assert _unchanged(model, before)


def test_rank_too_large_is_refused_before_any_change():
    model = hf_models.tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    config = LoraConfig(r=24, target_modules=["q_proj", "k_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig())
    with pytest.raises(ValueError, match=r"r <= min\(in_features, out_features\) = 16 on .*k_proj"):
        get_lora_model(model, config, seed=0)
    assert _unchanged(model, before)


# --- a bitsandbytes 4-bit model ---------------------------------------------------------------


def _quantize_targets(model, targets=TARGETS):
    """Swap the targeted nn.Linear layers for bnb Linear4bit (NF4) holding the same weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  quant_type="nf4", compress_statistics=False, compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(module.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=False)
            q = q.to("cpu")  # quantises
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model


def test_lora_wraps_linear4bit_on_cpu():
    model = get_lora_model(_quantize_targets(hf_models.tiny_llama()), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), seed=0)
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    assert layer.quantized and (layer.in_features, layer.out_features) == (32, 32)
    x = torch.randn(3, 32)
    q = BF.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    expected = x @ (q + _product(layer).detach()).t()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError, match="4-bit"):
        layer.merge()
    with pytest.raises(TypeError, match="uint8 .*use replace_lora_weights_loftq"):
        get_lora_model(_quantize_targets(hf_models.tiny_llama()), _cfg(), seed=0)
    with pytest.raises(NotImplementedError, match="4-bit base layer only init_lora_weights=True/False"):
        get_lora_model(_quantize_targets(hf_models.tiny_llama()), LoraConfig(target_modules=TARGETS, use_dora=True), seed=0)


def test_replace_lora_weights_loftq_with_rollback(tmp_path):
    original = hf_models.tiny_llama()
    hf_models.save_base(original, tmp_path)
    model = get_lora_model(_quantize_targets(hf_models.tiny_llama()), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=0)
    before = {n: (l.lora_A["default"].weight.clone(), l.lora_B["default"].weight.clone()) for n, l in model.lora_layers()}
    seen = []

    def keep_unless_v_proj(m, name):
        seen.append(name)
        return not name.endswith("v_proj")

    replace_lora_weights_loftq(model, model_path=str(tmp_path), callback=keep_unless_v_proj)
    assert sorted(seen) == sorted(before)
    weights = dict(original.named_parameters())
    for name, layer in model.lora_layers():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if name.endswith("v_proj"):  # rolled back
            assert torch.equal(a, before[name][0]) and torch.equal(b, before[name][1])
            continue
        w = weights[name + ".weight"].detach()
        q = BF.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        torch.testing.assert_close(_product(layer), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-6, rtol=0)
    ids = hf_models.sample_ids()
    with torch.no_grad():
        exact = original(ids).logits
        with_loftq = model(ids).logits
        with model.disable_adapter():
            quantised = model(ids).logits
    assert (with_loftq - exact).abs().max() < (quantised - exact).abs().max()


def test_replace_lora_weights_loftq_on_a_transformers_4bit_model(tmp_path):
    """A model loaded by transformers with BitsAndBytesConfig (NF4, CPU). Its first inference
    forward makes bitsandbytes repack the weights for its AVX512 CPU kernel (on such CPUs),
    which LoftQ must read through."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    original = hf_models.tiny_llama(**hf_models.MEGATRON_LLAMA)  # widths that are whole 64-blocks
    hf_models.save_base(original, tmp_path)
    quantised = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    )
    quantised.eval()
    ids = hf_models.sample_ids()
    with torch.no_grad():
        quantised(ids)
    model = get_lora_model(quantised, LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), seed=0)
    replace_lora_weights_loftq(model, model_path=str(tmp_path))
    weights = dict(original.named_parameters())
    for name, layer in model.lora_layers():
        w = weights[name + ".weight"].detach()
        # transformers quantises as bnb's quantize_4bit does; a repacked layer (AVX512-BF16 CPUs)
        # then holds the same codes with its block scales rounded to bf16
        q, state = BF.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False)
        if getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False):
            state.absmax = state.absmax.bfloat16().float()
        q = BF.dequantize_4bit(q, state)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        torch.testing.assert_close(_product(layer), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-6, rtol=0)
        assert (w - q - _product(layer)).norm() < 0.95 * (w - q).norm()  # the error LoftQ absorbs
    # (logits are no test here: every other linear layer is quantised too, and bitsandbytes'
    # CPU kernel computes in bf16)


def test_replace_lora_weights_loftq_with_the_wrong_original_changes_nothing(tmp_path):
    hf_models.save_base(hf_models.tiny_llama(intermediate_size=48), tmp_path)  # down_proj is 32x48 there
    model = get_lora_model(_quantize_targets(hf_models.tiny_llama()), LoraConfig(r=4, target_modules=TARGETS), seed=0)
    before = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    with pytest.raises(ValueError, match=r"down_proj'.*shape \(32, 48\), the layer is 32x64"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path))
    after = model.adapter_state_dict("default")
    assert all(torch.equal(before[k], after[k]) for k in before)  # q_proj / v_proj (checked first) untouched


def test_replace_lora_weights_loftq_needs_a_4bit_model(tmp_path):
    hf_models.save_base(hf_models.tiny_llama(), tmp_path)
    model = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=4, target_modules=TARGETS), seed=0)
    with pytest.raises(ValueError, match="no LoRA layer on a bitsandbytes Linear4bit"):
        replace_lora_weights_loftq(model, model_path=str(tmp_path))


# --- megatron: TP layout invariance ------------------------------------------------------------

COLUMN = ["linear_qkv", "linear_fc1"]


def _gpt_loftq(targets: list[str], iters_list: tuple[int, ...]):
    from megatron.core import parallel_state as ps

    from tests.models import build_tiny_gpt, tiny_gpt_config
    from tests.tp_utils import gather_param, gathered_adapters

    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for iters in iters_list:
        torch.manual_seed(0)
        base = build_tiny_gpt(tiny_gpt_config(tp, False, num_attention_heads=8, num_query_groups=4))
        originals = {n.removesuffix(".weight"): gather_param(p) for n, p in base.named_parameters() if n.endswith("weight")}
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="loftq",
                            loftq_config=LoftQConfig(loftq_iter=iters))
        try:
            model = get_lora_model(base, config, seed=0)
        except ValueError as exc:
            after = {n.removesuffix(".weight"): gather_param(p) for n, p in base.named_parameters() if n.endswith("weight")}
            out[iters] = dict(error=str(exc), unchanged=all(torch.equal(after[n], originals[n]) for n in originals))
            continue
        products, weights, replicated_equal = gathered_adapters(model)
        out[iters] = dict(originals=originals, products=products, weights=weights, replicated_equal=replicated_equal)
    return out


def _same_codes(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    """Q bitwise equal; after a second iteration, where Q = NF4(W - s·B·A) and s·B·A differs
    by fp rounding (Gram-eigh vs LAPACK, or another TP blocking), a value sitting on an NF4
    rounding boundary may land on the neighbouring code, and a block's absmax (its scale)
    moves by fp rounding: allow those."""
    if exact:
        assert torch.equal(got, want)
    else:
        flipped = (got - want).abs() > 1e-6
        assert flipped.float().mean() < 2e-3, float(flipped.float().mean())
        torch.testing.assert_close(got, want, atol=0.02, rtol=0)


@pytest.mark.parametrize("tp, targets", [(2, COLUMN + ["linear_fc2"]), (4, COLUMN)])
def test_megatron_tp_equals_tp1_and_the_formula(tp, targets):
    ref = run_distributed(_gpt_loftq, 1, tp=1, args=(targets, (1, 2)))[0]
    for iters in (1, 2):
        assert len(ref[iters]["products"]) == 2 * len(targets)
        for name, product in ref[iters]["products"].items():
            q, exact = _reference(ref[iters]["originals"][name], 4, 2.0, iters)
            _same_codes(ref[iters]["weights"][name], q, exact=iters == 1)
            torch.testing.assert_close(product, exact, atol=1e-5, rtol=0)  # Gram-eigh vs LAPACK SVD
    for rank, res in enumerate(run_distributed(_gpt_loftq, tp, tp=tp, args=(targets, (1, 2)))):
        for iters in (1, 2):
            assert res[iters]["replicated_equal"], rank
            for name in ref[iters]["products"]:
                # NF4 per shard == global NF4: bitwise at one iteration
                _same_codes(res[iters]["weights"][name], ref[iters]["weights"][name], exact=iters == 1)
                torch.testing.assert_close(res[iters]["products"][name], ref[iters]["products"][name], atol=1e-5, rtol=0)


def test_megatron_shards_splitting_nf4_blocks_are_refused():
    # TP=4: linear_proj keeps 64/4 = 16 input columns per shard, not whole 64-value blocks
    results = run_distributed(_gpt_loftq, 4, tp=4, args=(["linear_qkv", "linear_proj"], (1,)))
    for res in (r[1] for r in results):
        assert "row-parallel with 16 columns per shard" in res["error"]
        assert "NF4 block size 64" in res["error"]
        assert res["unchanged"]  # validated before the first weight (linear_qkv) was rewritten
