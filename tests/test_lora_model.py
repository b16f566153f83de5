"""LoraModel: injection, adapter lifecycle, trainability, merge/unload, on tiny HF models."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are built from configs: no downloads

import pytest
import torch
from torch import nn

from dist_lora import ConfigError, LoraConfig, LoraModel, get_lora_model
from dist_lora.checkpoint.peft_format import load_adapter_weights
from dist_lora.layers import LoraLayer
from dist_lora.modules_to_save import ModulesToSaveWrapper

try:
    from . import hf_models
except ImportError:
    import hf_models

ids = hf_models.sample_ids()


def _cfg(**kw) -> LoraConfig:
    base = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base.update(kw)
    return LoraConfig(**base)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _lora_names(model, adapter) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


# --- freezing and parameter counts -------------------------------------------------------------


def test_get_lora_model_freezes_base_and_trains_only_active_lora():
    model = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=0)
    model.add_adapter("other", _cfg(target_modules=["o_proj"]))
    trainable = _trainable(model)
    assert trainable, "no trainable parameters"
    # only the active adapter's factors train
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable), trainable
    expected = {
        f"model.model.layers.{i}.self_attn.{p}.lora_{ab}.default.weight"
        for i in (0, 1)
        for p in ("q_proj", "v_proj")
        for ab in "AB"
    }
    assert trainable == expected
    # every base parameter is frozen
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert not param.requires_grad, name


def test_nb_trainable_parameters_matches_hand_count(capsys):
    base = hf_models.tiny_llama()
    n_base = sum(p.numel() for p in base.parameters())
    model = get_lora_model(base, _cfg(r=4), seed=0)
    hidden, kv = 32, 2 * (32 // 4)  # 2 kv heads of head_dim 8
    per_layer = (4 * hidden + hidden * 4) + (4 * hidden + kv * 4)  # q_proj: A+B, v_proj: A+B
    expected_trainable = 2 * per_layer
    assert expected_trainable == 896
    assert model.get_nb_trainable_parameters() == (expected_trainable, n_base + expected_trainable)
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert "trainable params: 896" in out
    assert f"all params: {n_base + 896:,d}" in out


def test_rank_and_alpha_pattern_applied_per_module():
    model = get_lora_model(
        hf_models.tiny_llama(),
        _cfg(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}),
        seed=0,
    )
    q0 = model.model.model.layers[0].self_attn.q_proj
    q1 = model.model.model.layers[1].self_attn.q_proj
    v0 = model.model.model.layers[0].self_attn.v_proj
    assert q0.r["default"] == 4 and q0.scaling["default"] == pytest.approx(2.0)
    assert q1.r["default"] == 2 and q1.lora_A["default"].weight.shape == (2, 32)
    assert q1.scaling["default"] == pytest.approx(4.0)  # alpha 8 / r 2
    assert v0.scaling["default"] == pytest.approx(3 / 4)


# --- adapter lifecycle ---------------------------------------------------------------------------


def test_add_set_delete_adapter():
    model = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=0)
    out_default = hf_models.logits(model, ids)
    model.add_adapter("second", _cfg(r=2, target_modules=["k_proj", "v_proj"]))
    assert set(model.peft_config) == {"default", "second"}
    assert model.active_adapter == "default"
    # adding an adapter does not activate it
    torch.testing.assert_close(hf_models.logits(model, ids), out_default)

    model.set_adapter("second")
    assert model.active_adapters == ["second"]
    out_second = hf_models.logits(model, ids)
    assert not torch.allclose(out_second, out_default, atol=1e-4)
    assert _trainable(model) and all(".second." in n for n in _trainable(model))
    # layers without the active adapter run their base path (q_proj has only 'default')
    q = model.model.model.layers[0].self_attn.q_proj
    assert q.active_adapters == []

    # deleting the active adapter makes another one active
    model.delete_adapter("second")
    assert set(model.peft_config) == {"default"}
    assert model.active_adapters == ["default"]
    assert not any("second" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(hf_models.logits(model, ids), out_default)
    assert _trainable(model) and all(".default." in n for n in _trainable(model))

    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", _cfg())


def test_enable_disable_adapter_layers_and_context_manager():
    reference = hf_models.tiny_llama()
    base_out = hf_models.logits(reference, ids)
    model = get_lora_model(hf_models.tiny_llama(), _cfg(modules_to_save=["lm_head"]), seed=0)
    with torch.no_grad():
        model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    lora_out = hf_models.logits(model, ids)
    assert not torch.allclose(lora_out, base_out, atol=1e-3)

    model.disable_adapter_layers()
    torch.testing.assert_close(hf_models.logits(model, ids), base_out, atol=1e-6, rtol=1e-6)
    model.enable_adapter_layers()
    torch.testing.assert_close(hf_models.logits(model, ids), lora_out, atol=1e-6, rtol=1e-6)

    with model.disable_adapter():
        torch.testing.assert_close(hf_models.logits(model, ids), base_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hf_models.logits(model, ids), lora_out, atol=1e-6, rtol=1e-6)

    # adapters come back even if the body raises
    with pytest.raises(RuntimeError):
        with model.disable_adapter():
            raise RuntimeError("boom")
    torch.testing.assert_close(hf_models.logits(model, ids), lora_out, atol=1e-6, rtol=1e-6)


def test_disable_adapter_after_merge_gives_base_output():
    base_out = hf_models.logits(hf_models.tiny_llama(), ids)
    model = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=0)
    lora_out = hf_models.logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(hf_models.logits(model, ids), lora_out, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(hf_models.logits(model, ids), base_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_models.logits(model, ids), lora_out, atol=1e-5, rtol=1e-5)


def test_inference_mode_config_has_nothing_trainable():
    model = get_lora_model(hf_models.tiny_llama(), _cfg(inference_mode=True, bias="all"), seed=0)
    assert _trainable(model) == set()
    assert model.get_nb_trainable_parameters()[0] == 0
    # but the adapter is active
    assert not torch.allclose(hf_models.logits(model, ids), hf_models.logits(hf_models.tiny_llama(), ids), atol=1e-3)


def test_bias_all_and_lora_only_on_qwen2():
    # Qwen2: q/k/v have biases, o_proj has none
    all_biases = {n for n, _ in hf_models.tiny_qwen2().named_parameters() if n.endswith("bias")}
    assert len(all_biases) == 6

    none = get_lora_model(hf_models.tiny_qwen2(), _cfg(target_modules=["q_proj", "o_proj"]), seed=0)
    assert not any(n.endswith("bias") for n in _trainable(none))

    lora_only = get_lora_model(hf_models.tiny_qwen2(), _cfg(target_modules=["q_proj", "o_proj"], bias="lora_only"), seed=0)
    biases = {n for n in _trainable(lora_only) if n.endswith("bias")}
    assert biases == {f"model.model.layers.{i}.self_attn.q_proj.base_layer.bias" for i in (0, 1)}

    all_ = get_lora_model(hf_models.tiny_qwen2(), _cfg(target_modules=["q_proj", "o_proj"], bias="all"), seed=0)
    biases = {n for n in _trainable(all_) if n.endswith("bias")}
    expected = {"model." + n.replace("q_proj.bias", "q_proj.base_layer.bias") for n in all_biases}
    assert biases == expected
    # weights stay frozen
    assert not any(n.endswith("weight") and "lora_" not in n for n in _trainable(all_))


def test_bias_all_on_gpt2_includes_layernorm_biases():
    model = get_lora_model(hf_models.tiny_gpt2(), _cfg(target_modules=["c_attn"], bias="all", fan_in_fan_out=True), seed=0)
    trainable = _trainable(model)
    assert "model.transformer.h.0.ln_1.bias" in trainable
    assert "model.transformer.h.1.mlp.c_fc.bias" in trainable
    assert "model.transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "model.transformer.h.0.ln_1.weight" not in trainable


def test_modules_to_save_trainable_copy():
    base = hf_models.tiny_llama()
    head0 = base.lm_head.weight.detach().clone()
    model = get_lora_model(base, _cfg(modules_to_save=["lm_head"]), seed=0)
    wrapper = model.model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    copy_w = wrapper.modules_to_save["default"].weight
    assert copy_w.requires_grad
    assert not wrapper.original_module.weight.requires_grad
    assert copy_w.data_ptr() != wrapper.original_module.weight.data_ptr()
    torch.testing.assert_close(copy_w.detach(), head0, atol=0, rtol=0)

    # train the copy: the original is unchanged and the output follows the copy
    out = model(input_ids=ids).logits
    out.sum().backward()
    assert copy_w.grad is not None and wrapper.original_module.weight.grad is None
    with torch.no_grad():
        copy_w.add_(0.5)
    assert torch.equal(wrapper.original_module.weight, head0)
    out2 = hf_models.logits(model, ids)
    assert not torch.allclose(out2, out.detach(), atol=1e-3)

    sd = model.adapter_state_dict()
    assert "base_model.model.lm_head.weight" in sd
    torch.testing.assert_close(sd["base_model.model.lm_head.weight"], copy_w.detach())
    assert not any("modules_to_save" in k or "original_module" in k or "default" in k for k in sd)


def test_adapter_state_dict_keys_and_shapes():
    model = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=0)
    sd = model.adapter_state_dict()
    expected = {}
    for i in (0, 1):
        expected[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = (4, 32)
        expected[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = (32, 4)
        expected[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_A.weight"] = (4, 32)
        expected[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_B.weight"] = (16, 4)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


# --- config handling ---------------------------------------------------------------------------


def test_caller_config_not_mutated():
    config = _cfg(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], rank_pattern={"q_proj": 2})
    snapshot = copy.deepcopy(config)
    model = get_lora_model(hf_models.tiny_llama(), config, seed=0)
    model.add_adapter("b", config)
    model.set_adapter("b")
    model.delete_adapter("default")
    assert config == snapshot
    assert config.inference_mode is False
    assert model.peft_config["b"] is not config


def test_config_targeting_nothing_leaves_model_unchanged():
    model = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=0)
    before_out = hf_models.logits(model, ids)
    before_modules = [(n, type(m)) for n, m in model.named_modules()]
    before_params = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="matched no module"):
        model.add_adapter("bad", _cfg(target_modules=["does_not_exist"]))
    assert set(model.peft_config) == {"default"}
    assert [(n, type(m)) for n, m in model.named_modules()] == before_modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_params
    torch.testing.assert_close(hf_models.logits(model, ids), before_out, atol=0, rtol=0)


def test_bad_modules_to_save_leaves_no_half_injected_adapter():
    """The LoRA targets exist but modules_to_save matches nothing: the error must come before
    any layer is touched (not after the LoRA part was injected)."""
    model = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=0)
    before_modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ConfigError, match="modules_to_save"):
        model.add_adapter("bad", _cfg(target_modules=["o_proj"], modules_to_save=["no_such_head"]))
    assert set(model.peft_config) == {"default"}
    assert _lora_names(model, "bad") == set()
    assert [(n, type(m)) for n, m in model.named_modules()] == before_modules


def test_get_lora_model_targeting_nothing_leaves_base_unwrapped():
    base = hf_models.tiny_llama()
    with pytest.raises(ConfigError):
        get_lora_model(base, _cfg(target_modules=["q_proj"], modules_to_save=["no_such_head"]), seed=0)
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in base.modules())


def test_default_targets_for_known_architecture():
    model = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=2, init_lora_weights=False), seed=0)
    assert {n.split(".")[-1] for n, _ in model.lora_layers()} == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        (dict(init_lora_weights="eva"), "eva"),
    ],
)
def test_unsupported_features_raise_not_implemented(kwargs, feature, monkeypatch):
    # every init method is supported now; the refusal mechanism is checked with a pretend-unsupported one
    from dist_lora import init_kind

    monkeypatch.setattr(init_kind, "NOT_YET_SUPPORTED_INIT", (feature,))
    base = hf_models.tiny_llama()
    with pytest.raises(NotImplementedError, match=f"(?i){feature}.*not yet supported"):
        get_lora_model(base, _cfg(**kwargs), seed=0)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    model = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=0)
    with pytest.raises(NotImplementedError):
        model.add_adapter("x", _cfg(**kwargs))
    assert set(model.peft_config) == {"default"}


# --- low_cpu_mem_usage ---------------------------------------------------------------------


def test_low_cpu_mem_usage_meta_then_load_materialises(tmp_path):
    source = get_lora_model(hf_models.tiny_llama(), _cfg(lora_bias=True), seed=1)
    source.save_pretrained(tmp_path)
    expected = hf_models.logits(source, ids)

    model = get_lora_model(hf_models.tiny_llama(), _cfg(lora_bias=True), low_cpu_mem_usage=True, seed=0)
    lora_params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.is_meta for _, p in lora_params)
    assert not any(p.is_meta for n, p in model.named_parameters() if "lora_" not in n)

    load_adapter_weights(model, tmp_path, "default")
    assert not any(p.is_meta for _, p in model.named_parameters())
    torch.testing.assert_close(hf_models.logits(model, ids), expected, atol=1e-6, rtol=1e-6)
    # loaded parameters are still the trainable ones
    assert _trainable(model) == {n for n, _ in lora_params}


def test_from_pretrained_loads_and_materialises(tmp_path):
    source = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=1)
    source.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(hf_models.tiny_llama(), tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(hf_models.logits(loaded, ids), hf_models.logits(source, ids), atol=1e-6, rtol=1e-6)
    assert _trainable(loaded) == set()  # PEFT: from_pretrained is inference unless is_trainable
    trainable = LoraModel.from_pretrained(hf_models.tiny_llama(), tmp_path, is_trainable=True)
    assert _trainable(trainable) and all("lora_" in n for n in _trainable(trainable))


# --- merge_and_unload / unload ---------------------------------------------------------------


@pytest.mark.parametrize("factory", ["llama", "gpt2"])
def test_merge_and_unload(factory):
    model = get_lora_model(
        hf_models.FACTORIES[factory](), _cfg(target_modules="all-linear", lora_alpha=6, fan_in_fan_out=(factory == "gpt2")), seed=0
    )
    lora_out = hf_models.logits(model, ids)
    assert not torch.allclose(lora_out, hf_models.logits(hf_models.FACTORIES[factory](), ids), atol=1e-3)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    # state dict keys are the base model's again
    assert set(merged.state_dict()) == set(hf_models.FACTORIES[factory]().state_dict())
    torch.testing.assert_close(hf_models.logits(merged, ids), lora_out, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_with_modules_to_save_and_safe_merge():
    model = get_lora_model(hf_models.tiny_llama(), _cfg(modules_to_save=["lm_head"]), seed=0)
    with torch.no_grad():
        model.model.lm_head.modules_to_save["default"].weight.mul_(2.0)
    lora_out = hf_models.logits(model, ids)
    merged = model.merge_and_unload(safe_merge=True)
    assert isinstance(merged.lm_head, nn.Linear)
    torch.testing.assert_close(hf_models.logits(merged, ids), lora_out, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_safe_merge_nan_changes_nothing():
    model = get_lora_model(hf_models.tiny_llama(), _cfg(), seed=0)
    layer = model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="NaN|Inf"):
        model.merge_and_unload(safe_merge=True)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, weights[n]), n
    assert not any(layer.merged for _, layer in model.lora_layers())
    # still a LoRA model (not unloaded)
    assert isinstance(model.model.model.layers[0].self_attn.q_proj, LoraLayer)
    assert isinstance(model.model.model.layers[1].self_attn.v_proj, LoraLayer)


def test_unload_gives_original_base_output():
    base_out = hf_models.logits(hf_models.tiny_llama(), ids)
    model = get_lora_model(hf_models.tiny_llama(), _cfg(target_modules="all-linear"), seed=0)
    assert not torch.allclose(hf_models.logits(model, ids), base_out, atol=1e-3)
    base = model.unload()
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    assert isinstance(base.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(hf_models.logits(base, ids), base_out, atol=0, rtol=0)


def test_merge_lora_bias_without_base_bias_fails_cleanly():
    """Qwen2's o_proj has no bias to merge a lora_B bias into (PEFT: 'Impossible to merge').
    The error names the problem and the model still computes the LoRA function."""
    model = get_lora_model(hf_models.tiny_qwen2(), _cfg(target_modules=["q_proj", "o_proj"], lora_bias=True), seed=0)
    out = hf_models.logits(model, ids)
    with pytest.raises(ValueError, match="no bias"):
        model.merge_and_unload()
    assert _has_any_lora(model)
    torch.testing.assert_close(hf_models.logits(model, ids), out, atol=1e-5, rtol=1e-5)


def _has_any_lora(model) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())
