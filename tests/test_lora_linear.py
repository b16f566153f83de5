"""LoraLinear (nn.Linear and transformers Conv1D) against hand-written dense formulas.

Reference: y = W x + b + s · (B A x) [+ s · b_B], s = alpha / r (alpha / sqrt(r) with rslora).
Every expected value is computed here from the layer's parameters with plain torch ops.
"""

from __future__ import annotations

import math
import warnings
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are built from configs: no downloads

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dist_lora import LoraConfig, get_lora_model
from dist_lora.layers import LoraLinear

IN, OUT = 24, 20


def _linear(seed: int = 0, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias).to(dtype)


def _conv1d(seed: int = 0) -> Conv1D:
    torch.manual_seed(seed)
    layer = Conv1D(OUT, IN)  # weight [in, out]
    with torch.no_grad():
        layer.weight.normal_(0, 0.2)
        layer.bias.normal_(0, 0.2)
    return layer


def _lora(base: nn.Module, adapter="default", r=4, alpha=8.0, init=False, seed=0, **kw) -> LoraLinear:
    layer = base if isinstance(base, LoraLinear) else LoraLinear(base, fan_in_fan_out=isinstance(base, Conv1D))
    layer.update_layer(adapter, r=r, lora_alpha=alpha, init_lora_weights=init, seed=seed, **kw)
    return layer


def _x(batch=(3, 5), seed=7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, IN, generator=gen)


def _dense_base(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """W x + b written out by hand; Conv1D stores W transposed ([in, out])."""
    base = layer.base_layer
    w = base.weight.detach()
    w = w.T if isinstance(base, Conv1D) else w
    y = x @ w.T
    if base.bias is not None:
        y = y + base.bias.detach()
    return y


def _factors(layer: LoraLinear, adapter: str):
    a = layer.lora_A[adapter].weight.detach().clone()
    b = layer.lora_B[adapter].weight.detach().clone()
    bias = layer.lora_B[adapter].bias
    return a, b, None if bias is None else bias.detach().clone()


def _scale(alpha, r, rslora=False):
    return alpha / math.sqrt(r) if rslora else alpha / r


# --- forward / backward against the dense formula ------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_match_dense_formula(kind, rslora):
    base = _linear() if kind == "linear" else _conv1d()
    r, alpha = 4, 6.0
    layer = _lora(base, r=r, alpha=alpha, use_rslora=rslora)
    assert layer.fan_in_fan_out == (kind == "conv1d")
    s = _scale(alpha, r, rslora)
    assert layer.scaling["default"] == pytest.approx(s)
    x = _x()
    a, b, _ = _factors(layer, "default")
    assert b.abs().sum() > 0  # init False: the update is not zero, so the check has teeth

    # dense reference with its own leaf tensors
    a_ref, b_ref = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y_ref = _dense_base(layer, x) + s * (x @ a_ref.T @ b_ref.T)
    y = layer(x)
    assert y.shape == (3, 5, OUT)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    # the adapter term is not negligible: the test would notice a missing or wrong scale
    assert (y - _dense_base(layer, x)).abs().max() > 1e-2

    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b_ref.grad, atol=1e-5, rtol=1e-5)


def test_input_gradient_matches_dense_formula():
    layer = _lora(_linear(), r=3, alpha=5.0)
    layer.base_layer.requires_grad_(False)
    s = 5.0 / 3
    a, b, _ = _factors(layer, "default")
    x = _x().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = _dense_base(layer, x_ref) + s * (x_ref @ a.T @ b.T)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_bias_adds_scaled_bias(kind):
    base = _linear() if kind == "linear" else _conv1d()
    r, alpha = 4, 8.0
    layer = _lora(base, r=r, alpha=alpha, lora_bias=True)
    s = alpha / r
    a, b, bb = _factors(layer, "default")
    assert bb is not None and bb.shape == (OUT,) and bb.abs().sum() > 0
    x = _x()
    expected = _dense_base(layer, x) + s * (x @ a.T @ b.T + bb)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # and the bias gets the gradient s * sum(dy)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    torch.testing.assert_close(layer.lora_B["default"].bias.grad, s * g.sum(dim=(0, 1)), atol=1e-5, rtol=1e-5)


def test_lora_bias_zero_with_default_init():
    layer = _lora(_linear(), init=True, lora_bias=True)
    assert torch.count_nonzero(layer.lora_B["default"].bias) == 0


def test_multiple_active_adapters_add_up_and_set_adapter_switches():
    layer = _lora(_linear(), "a", r=2, alpha=3.0, seed=1)
    _lora(layer, "b", r=5, alpha=7.0, seed=2)
    x = _x()
    a1, b1, _ = _factors(layer, "a")
    a2, b2, _ = _factors(layer, "b")
    base = _dense_base(layer, x)
    only_a = base + (3.0 / 2) * (x @ a1.T @ b1.T)
    only_b = base + (7.0 / 5) * (x @ a2.T @ b2.T)
    both = base + (3.0 / 2) * (x @ a1.T @ b1.T) + (7.0 / 5) * (x @ a2.T @ b2.T)

    # the first adapter added is the active one
    assert layer.active_adapters == ["a"]
    torch.testing.assert_close(layer(x), only_a, atol=1e-5, rtol=1e-5)
    layer.set_adapter(["a", "b"])
    torch.testing.assert_close(layer(x), both, atol=1e-5, rtol=1e-5)
    layer.set_adapter("b")
    torch.testing.assert_close(layer(x), only_b, atol=1e-5, rtol=1e-5)
    # active adapters train, inactive ones are frozen
    assert layer.lora_A["b"].weight.requires_grad and layer.lora_B["b"].weight.requires_grad
    assert not layer.lora_A["a"].weight.requires_grad and not layer.lora_B["a"].weight.requires_grad


def test_disabled_adapters_give_base_output_exactly():
    base = _linear()
    reference = _linear()  # same seed: an untouched copy of the base layer
    layer = _lora(base, "a", seed=1)
    _lora(layer, "b", seed=2)
    layer.set_adapter(["a", "b"])
    x = _x()
    assert not torch.equal(layer(x), reference(x))
    layer.enable_adapters(False)
    assert layer.disable_adapters
    assert torch.equal(layer(x), reference(x))
    layer.enable_adapters(True)
    assert not torch.equal(layer(x), reference(x))


def test_disabled_after_merge_gives_base_output():
    """PEFT unmerges when adapters are disabled: a disabled layer computes the base function
    whether or not its adapters were merged."""
    reference = _linear()
    layer = _lora(_linear())
    x = _x()
    lora_out = layer(x).detach()
    layer.merge()
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), reference(x), atol=1e-6, rtol=1e-6)
    layer.enable_adapters(True)
    torch.testing.assert_close(layer(x), lora_out, atol=1e-5, rtol=1e-5)


# --- initialisation ---------------------------------------------------------------------------


def test_init_true_is_kaiming_uniform_a_and_zero_b():
    in_features = 256
    torch.manual_seed(0)
    layer = _lora(nn.Linear(in_features, 64), r=8, init=True)
    a, b, _ = _factors(layer, "default")
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(in_features)
    assert a.abs().max() <= bound + 1e-7
    assert torch.count_nonzero(a) == a.numel()
    # uniform on [-bound, bound]: spread over the range, std = bound / sqrt(3)
    assert a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # the adapter starts as the identity update
    x = torch.randn(4, in_features)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_init_gaussian_has_std_one_over_r():
    r = 4
    torch.manual_seed(0)
    layer = _lora(nn.Linear(512, 64), r=r, init="gaussian")
    a, b, _ = _factors(layer, "default")
    assert torch.count_nonzero(b) == 0
    assert a.std().item() == pytest.approx(1 / r, rel=0.08)
    assert abs(a.mean().item()) < 0.02


def test_init_false_gives_nonzero_b():
    layer = _lora(_linear(), init=False)
    a, b, _ = _factors(layer, "default")
    assert torch.count_nonzero(b) == b.numel()
    assert torch.count_nonzero(a) == a.numel()


def test_same_seed_same_factors_different_seed_different_factors():
    l1 = _lora(_linear(), seed=123)
    l2 = _lora(_linear(), seed=123)
    l3 = _lora(_linear(), seed=124)
    for name in ("lora_A", "lora_B"):
        w1 = getattr(l1, name)["default"].weight
        assert torch.equal(w1, getattr(l2, name)["default"].weight)
        assert not torch.equal(w1, getattr(l3, name)["default"].weight)


def _two_layer_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, IN), nn.Linear(IN, IN))


def test_factors_depend_on_module_name_and_seed_not_on_global_rng():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], init_lora_weights=False)
    torch.manual_seed(99)
    m1 = get_lora_model(_two_layer_net(), cfg, seed=5)
    torch.manual_seed(1)  # a different global RNG state must not change the factors
    m2 = get_lora_model(_two_layer_net(), cfg, seed=5)
    m3 = get_lora_model(_two_layer_net(), cfg, seed=6)
    a = {i: m1.model[i].lora_A["default"].weight for i in (0, 1)}
    # identical modules with different names get different factors
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(m1.model[0].lora_B["default"].weight, m1.model[1].lora_B["default"].weight)
    # same seed and name -> identical; another seed -> different
    for i in (0, 1):
        assert torch.equal(a[i], m2.model[i].lora_A["default"].weight)
        assert torch.equal(m1.model[i].lora_B["default"].weight, m2.model[i].lora_B["default"].weight)
        assert not torch.equal(a[i], m3.model[i].lora_A["default"].weight)


def test_adapter_name_changes_factors():
    layer = _lora(_linear(), "a", seed=0)
    _lora(layer, "b", seed=0)  # same explicit seed on the layer: same draw
    assert torch.equal(layer.lora_A["a"].weight, layer.lora_A["b"].weight)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    model = get_lora_model(_two_layer_net(), cfg, seed=0)
    model.add_adapter("other", cfg)
    assert not torch.equal(model.model[0].lora_A["default"].weight, model.model[0].lora_A["other"].weight)


# --- merge / unmerge ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_merge_matches_unmerged_and_unmerge_restores(kind, lora_bias):
    base = _linear() if kind == "linear" else _conv1d()
    w0 = base.weight.detach().clone()
    b0 = base.bias.detach().clone()
    layer = _lora(base, "a", seed=1, lora_bias=lora_bias)
    _lora(layer, "b", r=2, alpha=5.0, seed=2, lora_bias=lora_bias)
    layer.set_adapter(["a", "b"])
    x = _x()
    with torch.no_grad():
        unmerged = layer(x)
    layer.merge()
    assert layer.merged and sorted(layer.merged_adapters) == ["a", "b"]
    # the merged weight is W + sum s B A (transposed for Conv1D), computed here by hand
    delta = sum(
        layer.scaling[n] * (layer.lora_B[n].weight @ layer.lora_A[n].weight) for n in ("a", "b")
    ).detach()
    expected_w = w0 + (delta.T if kind == "conv1d" else delta)
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected_w, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        merged = layer(x)
        merged_base_only = layer.base_layer(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # once merged, the adapter path is not added a second time
    torch.testing.assert_close(merged, merged_base_only, atol=0, rtol=0)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.base_layer.bias.detach(), b0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x).detach(), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_selected_adapter_only():
    layer = _lora(_linear(), "a", seed=1)
    _lora(layer, "b", seed=2)
    layer.set_adapter(["a", "b"])
    x = _x()
    with torch.no_grad():
        out = layer(x)
    layer.merge(adapter_names=["a"])
    assert layer.merged_adapters == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)


def test_merge_bf16_base_keeps_dtype():
    base = _linear(dtype=torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer = _lora(base)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # adapters kept in fp32
    delta = (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    layer.merge()
    w = layer.base_layer.weight
    assert w.dtype == torch.bfloat16
    # bf16 rounding of (W + ΔW) computed in fp32
    torch.testing.assert_close(w.float(), (w0.float() + delta).to(torch.bfloat16).float(), atol=0, rtol=0)
    out = layer(_x().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_forward_bf16_base_returns_base_dtype():
    layer = _lora(_linear(dtype=torch.bfloat16))
    x = _x().to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    a, b, _ = _factors(layer, "default")
    expected = layer.base_layer(x).float() + 2.0 * (x.float() @ a.T @ b.T)
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=2e-2)


def test_merge_twice_warns_and_does_not_double_merge():
    layer = _lora(_linear())
    layer.merge()
    w_once = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w_once)
    assert layer.merged_adapters == ["default"]


def test_safe_merge_with_nan_raises_and_leaves_weight_untouched():
    layer = _lora(_linear(), lora_bias=True)
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    w_bytes = layer.base_layer.weight.detach().clone().view(torch.uint8)
    b_bytes = layer.base_layer.bias.detach().clone().view(torch.uint8)
    with pytest.raises(ValueError, match="NaN|Inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight.detach().view(torch.uint8), w_bytes)
    assert torch.equal(layer.base_layer.bias.detach().view(torch.uint8), b_bytes)
    assert not layer.merged


def test_unsafe_merge_with_nan_does_merge():
    """Without safe_merge, the NaN goes in (PEFT's behaviour): shows safe_merge is what protects."""
    layer = _lora(_linear())
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("nan")
    layer.merge()
    assert torch.isnan(layer.base_layer.weight).any()


# --- dropout -----------------------------------------------------------------------------------


def test_dropout_eval_is_deterministic_train_is_not():
    with_dropout = _lora(_linear(), seed=3, lora_dropout=0.5)
    without = _lora(_linear(), seed=3, lora_dropout=0.0)
    assert torch.equal(with_dropout.lora_A["default"].weight, without.lora_A["default"].weight)
    x = _x()
    with_dropout.eval()
    without.eval()
    with torch.no_grad():
        e1, e2, ref = with_dropout(x), with_dropout(x), without(x)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, ref, atol=1e-6, rtol=1e-6)

    with_dropout.train()
    torch.manual_seed(0)
    with torch.no_grad():
        t1 = with_dropout(x)
        t2 = with_dropout(x)
    assert not torch.allclose(t1, ref, atol=1e-3)
    assert not torch.allclose(t1, t2, atol=1e-3)
    # the base path is not dropped: base output is unaffected by the dropout module
    with_dropout.enable_adapters(False)
    with torch.no_grad():
        assert torch.equal(with_dropout(x), with_dropout.base_layer(x))


def test_dropout_train_matches_formula_with_recorded_mask():
    """With the dropout module's random draw replayed, the output is W x + b + s B A (mask·x/(1-p))."""
    p = 0.3
    layer = _lora(_linear(), seed=4, lora_dropout=p)
    layer.train()
    x = _x()
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    dropped = nn.functional.dropout(x, p=p, training=True)
    a, b, _ = _factors(layer, "default")
    expected = _dense_base(layer, x) + 2.0 * (dropped @ a.T @ b.T)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_fan_in_fan_out_mismatch_warns_and_uses_weight_layout():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        layer = LoraLinear(_conv1d(), fan_in_fan_out=False)
    assert any("fan_in_fan_out" in str(w.message) for w in rec)
    assert layer.fan_in_fan_out and layer.in_features == IN and layer.out_features == OUT
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        layer = LoraLinear(_linear(), fan_in_fan_out=True)
    assert not layer.fan_in_fan_out
