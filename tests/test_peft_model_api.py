"""PeftModel-level API parity with the real PEFT 0.21.2: the same calls on the same tiny model
give the same results (or the same refusal). Where dist_lora deliberately differs (it refuses
pickled files and mismatched tensors instead of writing / skipping them), the test says so."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import tempfile  # noqa: E402

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import dist_lora  # noqa: E402
from dist_lora import ConfigError, LoraConfig, LoraModel, get_lora_model  # noqa: E402
from dist_lora.layers import LoraLayer  # noqa: E402
from tests import hf_models  # noqa: E402

ids = hf_models.sample_ids()
TARGETS = ["q_proj", "v_proj"]


def _kwargs(**kw) -> dict:
    return {**dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), **kw}


def _pair(**kw):
    """The same trainable adapter in dist_lora and in PEFT (PEFT's random factors, loaded)."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(hf_models.tiny_llama(), peft.LoraConfig(**_kwargs(**kw)))
    with tempfile.TemporaryDirectory() as directory:
        theirs.save_pretrained(directory)
        ours = LoraModel.from_pretrained(hf_models.tiny_llama(), directory, is_trainable=True)
    torch.testing.assert_close(hf_models.logits(ours, ids), hf_models.logits(theirs, ids), atol=1e-6, rtol=0)
    return ours, theirs


def test_disable_adapter_restores_the_previous_state_like_peft():
    ours, theirs = _pair()
    base_out = hf_models.logits(hf_models.tiny_llama(), ids)
    lora_out = hf_models.logits(ours, ids)
    for model, tuner in ((ours, ours), (theirs, theirs.base_model)):
        tuner.disable_adapter_layers()
        with model.disable_adapter():
            torch.testing.assert_close(hf_models.logits(model, ids), base_out, atol=1e-6, rtol=0)
        # still disabled: the context does not switch on what the caller had switched off
        torch.testing.assert_close(hf_models.logits(model, ids), base_out, atol=1e-6, rtol=0)
        tuner.enable_adapter_layers()
        with model.disable_adapter():
            torch.testing.assert_close(hf_models.logits(model, ids), base_out, atol=1e-6, rtol=0)
        torch.testing.assert_close(hf_models.logits(model, ids), lora_out, atol=1e-6, rtol=0)


def test_load_adapter_returns_peft_result(tmp_path):
    ours, theirs = _pair()
    ours.save_pretrained(tmp_path)
    for model in (ours, theirs):
        result = model.load_adapter(str(tmp_path), "again")
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert tuple(result._fields) == ("missing_keys", "unexpected_keys")
    # low_cpu_mem_usage is accepted (the result is the same)
    ours.load_adapter(tmp_path, "third", low_cpu_mem_usage=True)
    ours.set_adapter("third")
    theirs.set_adapter("again")
    torch.testing.assert_close(hf_models.logits(ours, ids), hf_models.logits(theirs, ids), atol=1e-6, rtol=0)


def test_second_adapter_with_bias_is_refused_like_peft():
    ours, theirs = _pair(bias="lora_only")
    before = [(n, type(m)) for n, m in ours.named_modules()]
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        theirs.add_adapter("other", peft.LoraConfig(**_kwargs(bias="all")))
    with pytest.raises(ConfigError, match="supports only 1 adapter with bias"):
        ours.add_adapter("other", LoraConfig(**_kwargs(bias="all")))
    assert set(ours.peft_config) == {"default"}
    assert [(n, type(m)) for n, m in ours.named_modules()] == before
    ours.add_adapter("fine", LoraConfig(**_kwargs()))  # bias="none" is allowed


def test_peft_model_names():
    ours, theirs = _pair(modules_to_save=["lm_head"])
    q = "model.layers.0.self_attn.q_proj"
    assert isinstance(ours.base_model.model.get_submodule(q), LoraLayer)  # PEFT code: peft_model.base_model.model.X
    assert type(theirs.base_model.model.get_submodule(q)).__name__ == "Linear"
    assert ours.get_base_model() is ours.model
    assert type(ours.get_base_model()) is type(theirs.get_base_model())
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.targeted_module_names == theirs.base_model.targeted_module_names
    ours.add_adapter("k", LoraConfig(**_kwargs(target_modules=["k_proj", "q_proj"])))
    theirs.add_adapter("k", peft.LoraConfig(**_kwargs(target_modules=["k_proj", "q_proj"])))
    assert ours.targeted_module_names == theirs.base_model.targeted_module_names


def _status_fields(status) -> dict:
    fields = dataclasses.asdict(status)
    fields.pop("module_type", None)  # PEFT's class is lora.Linear, ours LoraLinear
    return fields


def test_layer_and_model_status_match_peft():
    ours, theirs = _pair(modules_to_save=["lm_head"])
    ours.add_adapter("second", LoraConfig(**_kwargs(target_modules=["q_proj"])))
    theirs.add_adapter("second", peft.LoraConfig(**_kwargs(target_modules=["q_proj"])))
    ours.merge_adapter(["second"])
    theirs.base_model.merge_adapter(["second"])
    ours_layers, their_layers = ours.get_layer_status(), theirs.get_layer_status()
    assert [_status_fields(s) for s in ours_layers] == [_status_fields(s) for s in their_layers]
    assert len(ours_layers) == 5 and ours_layers[0].merged_adapters == ["second"]
    ours_model, their_model = _status_fields(ours.get_model_status()), _status_fields(theirs.get_model_status())
    assert ours_model == their_model
    assert ours_model["merged_adapters"] == ["second"]  # merged in every layer that holds it
    assert _status_fields(dist_lora.get_model_status(ours)) == ours_model


def test_save_pretrained_is_safetensors_only(tmp_path):
    ours, _ = _pair()
    with pytest.raises(ConfigError, match="safe_serialization=False.*safetensors only"):
        ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin").exists()
    with pytest.raises(ValueError, match="nope"):
        ours.save_pretrained(tmp_path / "sel", selected_adapters=["default", "nope"])
    assert not (tmp_path / "sel").exists()  # checked before the first adapter was written
    ours.save_pretrained(tmp_path / "ok", safe_serialization=True)
    assert sorted(os.listdir(tmp_path / "ok")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_from_pretrained_config_argument_like_peft(tmp_path):
    ours, _ = _pair()
    ours.save_pretrained(tmp_path)
    config = LoraConfig(**_kwargs(lora_alpha=24))
    loaded = LoraModel.from_pretrained(hf_models.tiny_llama(), tmp_path, config=config)
    theirs = peft.PeftModel.from_pretrained(
        hf_models.tiny_llama(), str(tmp_path), config=peft.LoraConfig(**_kwargs(lora_alpha=24))
    )
    assert loaded.peft_config["default"].lora_alpha == 24
    torch.testing.assert_close(hf_models.logits(loaded, ids), hf_models.logits(theirs, ids), atol=1e-6, rtol=0)
    assert config.inference_mode is False  # ours copies the caller's config (PEFT changes it in place)
    with pytest.raises(ConfigError, match="config must be a dist_lora LoraConfig"):
        LoraModel.from_pretrained(hf_models.tiny_llama(), tmp_path, config=peft.LoraConfig(**_kwargs()))


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_like_peft(tmp_path, autocast):
    def bf16():
        return hf_models.tiny_llama().to(torch.bfloat16)

    want = torch.float32 if autocast else torch.bfloat16
    theirs = peft.get_peft_model(bf16(), peft.LoraConfig(**_kwargs()), autocast_adapter_dtype=autocast)
    ours = get_lora_model(bf16(), LoraConfig(**_kwargs()), seed=0, autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {want}
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {want}
    ours.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(bf16(), tmp_path, autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {want}
    peft_loaded = peft.PeftModel.from_pretrained(bf16(), str(tmp_path), autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in peft_loaded.named_parameters() if "lora_" in n} == {want}
    hf_models.logits(loaded, ids)  # runs in that dtype


def test_module_level_functions_like_peft():
    torch.manual_seed(0)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**_kwargs(init_lora_weights=True)), hf_models.tiny_llama())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_()
    ours = dist_lora.inject_adapter_in_model(LoraConfig(**_kwargs()), hf_models.tiny_llama())
    assert type(ours).__name__ == "LlamaForCausalLM" and set(ours.peft_config) == {"default"}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    state = peft.get_peft_model_state_dict(theirs)
    assert set(dist_lora.get_peft_model_state_dict(ours)) == set(state)  # no "base_model.model." prefix
    result = dist_lora.set_peft_model_state_dict(ours, state)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    torch.testing.assert_close(hf_models.logits(ours, ids), hf_models.logits(theirs, ids), atol=1e-6, rtol=0)
    assert [s.name for s in dist_lora.get_layer_status(ours)] == [s.name for s in peft.get_layer_status(theirs)]

    # targets from a state dict's keys instead of the config's target_modules
    targeted = dist_lora.inject_adapter_in_model(
        LoraConfig(**_kwargs(target_modules=["o_proj"])), hf_models.tiny_llama(), state_dict=state
    )
    assert set(dist_lora.get_peft_model_state_dict(targeted)) == set(state)

    # unlike PEFT, a tensor that does not fit is refused instead of skipped
    bad = {k: (v[:, :-1] if k.endswith("lora_A.weight") else v) for k, v in state.items()}
    with pytest.raises(ConfigError, match="shape|in_features"):
        dist_lora.set_peft_model_state_dict(ours, bad)
