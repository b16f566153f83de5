"""Interop with the real PEFT package (the reference), both directions, plus bad-file handling.

dist_lora -> files -> ``peft.PeftModel.from_pretrained`` and PEFT -> files -> dist_lora must
give the same logits on tiny Llama (GQA), Qwen2 (qkv biases), Qwen3 (q/k norms; dist_lora ->
PEFT) and GPT-2 (Conv1D). PEFT only
warns on missing keys and ignores unexpected ones, so every parity test also checks that the
adapter actually changes the output (a silently ignored file would not).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are built from configs: no downloads

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_lora import ConfigError, LoraConfig, LoraModel, get_lora_model
from dist_lora.layers import LoraLayer
from dist_lora.modules_to_save import ModulesToSaveWrapper

try:
    from . import hf_models
except ImportError:
    import hf_models

ids = hf_models.sample_ids()
ATOL = 1e-5

# Known PEFT 0.21.2 noise: it warns that lora_bias cannot be merged where the base layer has no
# bias, and mistakes 1-D lora_B.bias tensors for un-gathered ZeRO-3 shards when saving/loading.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape:UserWarning"),
]

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"llama": "all-linear", "qwen2": LLAMA_LINEAR, "qwen3": "all-linear", "gpt2": "all-linear"}
PATTERNS = {
    "llama": dict(
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3, "layers.0.mlp.up_proj": 16},
    ),
    "qwen2": dict(rank_pattern={"k_proj": 2, "layers.0.mlp.gate_proj": 7}, alpha_pattern={"q_proj": 5}),
    "qwen3": dict(rank_pattern={"v_proj": 3}, alpha_pattern={"o_proj": 5}, modules_to_save=["k_norm"]),
    "gpt2": dict(rank_pattern={"h.1.attn.c_attn": 2, "c_fc": 6}, alpha_pattern={"attn.c_proj": 3}),
}
VARIANTS = {
    "plain": {"task_type": "CAUSAL_LM"},
    "rslora": {"use_rslora": True},
    "patterns": None,  # filled per model from PATTERNS
    "lora_bias": {"lora_bias": True},
}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """Each tiny model saved once; ``fresh(kind)`` loads a new copy of the same weights."""
    root = tmp_path_factory.mktemp("bases")
    return {kind: hf_models.save_base(factory(), root / kind) for kind, factory in hf_models.FACTORIES.items()}


def fresh(base_dirs, kind):
    return hf_models.load_base(base_dirs[kind])


def _dl_config(kind, variant, **extra) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=False)
    kwargs["fan_in_fan_out"] = kind == "gpt2"
    kwargs.update(PATTERNS[kind] if variant == "patterns" else VARIANTS[variant])
    kwargs.update(extra)
    return LoraConfig(**kwargs)


def _peft_config(kind, variant, **extra) -> peft.LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=False)
    kwargs["fan_in_fan_out"] = kind == "gpt2"
    kwargs.update(PATTERNS[kind] if variant == "patterns" else VARIANTS[variant])
    kwargs.update(extra)
    return peft.LoraConfig(**kwargs)


def _base_logits(base_dirs, kind):
    return hf_models.logits(fresh(base_dirs, kind), ids)


def _has_lora(model) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


# --- dist_lora -> PEFT ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gpt2"])
def test_dist_lora_adapter_loads_in_peft(base_dirs, tmp_path, kind, variant):
    ours = get_lora_model(fresh(base_dirs, kind), _dl_config(kind, variant), seed=3)
    expected = hf_models.logits(ours, ids)
    assert not torch.allclose(expected, _base_logits(base_dirs, kind), atol=1e-3)
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(fresh(base_dirs, kind), str(tmp_path))
    theirs.eval()
    torch.testing.assert_close(hf_models.logits(theirs, ids), expected, atol=ATOL, rtol=0)

    # PEFT holds exactly our tensors under exactly our names
    saved = load_file(tmp_path / "adapter_model.safetensors")
    peft_sd = get_peft_model_state_dict(theirs)
    assert set(peft_sd) == set(saved)
    for key, value in saved.items():
        assert torch.equal(peft_sd[key], value), key
    assert isinstance(theirs, peft.PeftModelForCausalLM) == (variant == "plain")


def test_saved_file_format(base_dirs, tmp_path):
    ours = get_lora_model(fresh(base_dirs, "llama"), _dl_config("llama", "plain", lora_alpha=12), seed=0)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    path = tmp_path / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sizes = {  # (in, out) by hand: hidden 32, 2 kv heads of 8, intermediate 64
        "self_attn.q_proj": (32, 32),
        "self_attn.k_proj": (32, 16),
        "self_attn.v_proj": (32, 16),
        "self_attn.o_proj": (32, 32),
        "mlp.gate_proj": (32, 64),
        "mlp.up_proj": (32, 64),
        "mlp.down_proj": (64, 32),
    }
    expected = {}
    for i in (0, 1):
        for mod, (fin, fout) in sizes.items():
            expected[f"base_model.model.model.layers.{i}.{mod}.lora_A.weight"] = (4, fin)
            expected[f"base_model.model.model.layers.{i}.{mod}.lora_B.weight"] = (fout, 4)
    assert shapes == expected
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in shapes
    assert not any("default" in k for k in shapes)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["lora_alpha"] == 12
    assert config["target_modules"] == "all-linear"
    assert config["use_rslora"] is False
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["task_type"] == "CAUSAL_LM"
    assert config["megatron_config"] is None
    assert config["inference_mode"] is True
    assert "runtime_config" not in config
    # the real PEFT parses it into the same settings
    parsed = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (parsed.r, parsed.lora_alpha, parsed.use_rslora) == (4, 12, False)
    # saving does not flip the live model into inference mode
    assert ours.peft_config["default"].inference_mode is False


def test_saved_lora_bias_and_patterns_in_file(base_dirs, tmp_path):
    ours = get_lora_model(
        fresh(base_dirs, "qwen2"), _dl_config("qwen2", "patterns", lora_bias=True, use_rslora=True), seed=0
    )
    ours.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sd["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (2, 32)
    assert sd["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"].shape == (7, 32)
    assert sd["base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"].shape == (4, 32)
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"].shape == (32,)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"k_proj": 2, "layers.0.mlp.gate_proj": 7}
    assert config["alpha_pattern"] == {"q_proj": 5}
    assert config["lora_bias"] is True and config["use_rslora"] is True


def test_non_default_adapter_saved_in_subdirectory(base_dirs, tmp_path):
    ours = get_lora_model(fresh(base_dirs, "llama"), _dl_config("llama", "plain"), seed=0)
    ours.add_adapter("second", _dl_config("llama", "plain", target_modules=["q_proj"], r=2))
    ours.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    sub = tmp_path / "second"
    keys = set(load_file(sub / "adapter_model.safetensors"))
    assert keys == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"
    }
    ours.set_adapter("second")
    expected = hf_models.logits(ours, ids)
    theirs = peft.PeftModel.from_pretrained(fresh(base_dirs, "llama"), str(sub))
    torch.testing.assert_close(hf_models.logits(theirs, ids), expected, atol=ATOL, rtol=0)


# --- PEFT -> dist_lora -----------------------------------------------------------------------


def _peft_saved(base_dirs, tmp_path, kind, variant, **extra):
    torch.manual_seed(42)
    theirs = peft.get_peft_model(fresh(base_dirs, kind), _peft_config(kind, variant, **extra))
    theirs.eval()
    expected = hf_models.logits(theirs, ids)
    assert not torch.allclose(expected, _base_logits(base_dirs, kind), atol=1e-3)
    theirs.save_pretrained(str(tmp_path))
    return expected


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_peft_adapter_loads_in_dist_lora(base_dirs, tmp_path, kind, variant):
    expected = _peft_saved(base_dirs, tmp_path, kind, variant)

    ours = LoraModel.from_pretrained(fresh(base_dirs, kind), tmp_path)
    assert not any(p.is_meta for p in ours.parameters())
    torch.testing.assert_close(hf_models.logits(ours, ids), expected, atol=ATOL, rtol=0)

    # load_adapter into an existing dist_lora model under another name
    host = get_lora_model(fresh(base_dirs, kind), _dl_config(kind, "plain", r=2), seed=9)
    host_out = hf_models.logits(host, ids)
    host.load_adapter(tmp_path, "other")
    assert set(host.peft_config) == {"default", "other"}
    torch.testing.assert_close(hf_models.logits(host, ids), host_out, atol=0, rtol=0)  # not activated
    host.set_adapter("other")
    torch.testing.assert_close(hf_models.logits(host, ids), expected, atol=ATOL, rtol=0)
    host.set_adapter("default")
    torch.testing.assert_close(hf_models.logits(host, ids), host_out, atol=0, rtol=0)


def test_peft_round_trip_through_dist_lora_save(base_dirs, tmp_path):
    """PEFT file -> dist_lora -> dist_lora file -> PEFT: same tensors, same logits."""
    expected = _peft_saved(base_dirs, tmp_path / "a", "qwen2", "patterns", lora_bias=True)
    ours = LoraModel.from_pretrained(fresh(base_dirs, "qwen2"), tmp_path / "a")
    ours.save_pretrained(tmp_path / "b")
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    theirs = peft.PeftModel.from_pretrained(fresh(base_dirs, "qwen2"), str(tmp_path / "b"))
    torch.testing.assert_close(hf_models.logits(theirs, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind, variant", [("gpt2", "patterns"), ("qwen2", "lora_bias")])
def test_merge_and_unload_matches_peft(base_dirs, tmp_path, kind, variant):
    """The same adapter merged by PEFT and by dist_lora gives the same plain HF model
    (Conv1D transposition, per-module scaling, lora_B bias merged into the base bias)."""
    # qwen2's o_proj / mlp have no bias to merge a lora_B bias into: target the q/k/v projections
    extra = {"target_modules": ["q_proj", "k_proj", "v_proj"]} if variant == "lora_bias" else {}
    ours = get_lora_model(fresh(base_dirs, kind), _dl_config(kind, variant, **extra), seed=4)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh(base_dirs, kind), str(tmp_path))
    expected = hf_models.logits(ours, ids)
    ours_merged = ours.merge_and_unload()
    theirs_merged = theirs.merge_and_unload()
    a, b = ours_merged.state_dict(), theirs_merged.state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6, msg=key)
    base = fresh(base_dirs, kind).state_dict()
    moved = {k for k in a if not torch.equal(a[k], base[k])}
    assert any(k.endswith("weight") for k in moved)
    assert any(k.endswith("bias") for k in moved) == (variant == "lora_bias")
    torch.testing.assert_close(hf_models.logits(ours_merged, ids), expected, atol=ATOL, rtol=0)


# --- modules_to_save -----------------------------------------------------------------------


def test_modules_to_save_round_trip_dist_lora_to_peft(base_dirs, tmp_path):
    ours = get_lora_model(
        fresh(base_dirs, "llama"), _dl_config("llama", "plain", modules_to_save=["lm_head"]), seed=0
    )
    with torch.no_grad():
        head = ours.model.lm_head.modules_to_save["default"].weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    expected = hf_models.logits(ours, ids)
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.lm_head.weight"], head.detach())

    theirs = peft.PeftModel.from_pretrained(fresh(base_dirs, "llama"), str(tmp_path))
    torch.testing.assert_close(hf_models.logits(theirs, ids), expected, atol=ATOL, rtol=0)
    peft_head = theirs.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(peft_head, head.detach())
    # without the head copy the outputs would differ: the head really is part of the adapter
    with torch.no_grad():
        ours.model.lm_head.modules_to_save["default"].weight.copy_(ours.model.lm_head.original_module.weight)
    assert not torch.allclose(hf_models.logits(ours, ids), expected, atol=1e-4)


def test_modules_to_save_round_trip_peft_to_dist_lora(base_dirs, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        fresh(base_dirs, "llama"), _peft_config("llama", "plain", modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        head = theirs.base_model.model.lm_head.modules_to_save["default"].weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    theirs.eval()
    expected = hf_models.logits(theirs, ids)
    theirs.save_pretrained(str(tmp_path))

    ours = LoraModel.from_pretrained(fresh(base_dirs, "llama"), tmp_path)
    assert isinstance(ours.model.lm_head, ModulesToSaveWrapper)
    assert torch.equal(ours.model.lm_head.modules_to_save["default"].weight, head.detach())
    torch.testing.assert_close(hf_models.logits(ours, ids), expected, atol=ATOL, rtol=0)

    host = get_lora_model(fresh(base_dirs, "llama"), _dl_config("llama", "plain", r=2), seed=1)
    host.load_adapter(tmp_path, "other")
    host.set_adapter("other")
    torch.testing.assert_close(hf_models.logits(host, ids), expected, atol=ATOL, rtol=0)


# --- bad files -------------------------------------------------------------------------------


class _Snapshot:
    """What must not change when a load fails."""

    def __init__(self, model: LoraModel):
        self.model = model
        self.adapters = sorted(model.peft_config)
        self.active = model.active_adapters
        self.modules = [(n, type(m)) for n, m in model.named_modules()]
        self.params = {n: (tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()}
        self.out = hf_models.logits(model, ids)

    def check(self):
        m = self.model
        assert sorted(m.peft_config) == self.adapters
        assert m.active_adapters == self.active
        assert [(n, type(x)) for n, x in m.named_modules()] == self.modules
        assert {n: (tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()} == self.params
        assert not any("other" in n for n, _ in m.named_parameters())
        assert not any(p.is_meta for p in m.parameters())
        torch.testing.assert_close(hf_models.logits(m, ids), self.out, atol=0, rtol=0)


@pytest.fixture
def llama_adapter_dir(base_dirs, tmp_path):
    """A valid dist_lora adapter for the tiny llama (with an lm_head copy)."""
    model = get_lora_model(
        fresh(base_dirs, "llama"), _dl_config("llama", "plain", modules_to_save=["lm_head"]), seed=5
    )
    path = tmp_path / "adapter"
    model.save_pretrained(path)
    return path


def _host(base_dirs):
    return get_lora_model(fresh(base_dirs, "llama"), _dl_config("llama", "plain", target_modules=["q_proj"]), seed=2)


def _check_failed_from_pretrained(base_dirs, directory, exc, match):
    base = fresh(base_dirs, "llama")
    out = hf_models.logits(base, ids)
    with pytest.raises(exc, match=match):
        LoraModel.from_pretrained(base, directory)
    # the caller's model is handed back without half-loaded adapter layers
    assert not _has_lora(base)
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in base.modules())
    assert not any(p.is_meta for p in base.parameters())
    torch.testing.assert_close(hf_models.logits(base, ids), out, atol=0, rtol=0)


def _check_failed_load_adapter(base_dirs, directory, exc, match):
    host = _host(base_dirs)
    snap = _Snapshot(host)
    with pytest.raises(exc, match=match):
        host.load_adapter(directory, "other")
    snap.check()


def test_missing_weights_file(base_dirs, llama_adapter_dir):
    os.remove(llama_adapter_dir / "adapter_model.safetensors")
    _check_failed_load_adapter(base_dirs, llama_adapter_dir, FileNotFoundError, "adapter_model.safetensors")
    _check_failed_from_pretrained(base_dirs, llama_adapter_dir, FileNotFoundError, "adapter_model.safetensors")


def test_missing_config_file(base_dirs, llama_adapter_dir):
    os.remove(llama_adapter_dir / "adapter_config.json")
    _check_failed_load_adapter(base_dirs, llama_adapter_dir, FileNotFoundError, "adapter_config.json")
    _check_failed_from_pretrained(base_dirs, llama_adapter_dir, FileNotFoundError, "adapter_config.json")


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "empty"])
def test_corrupt_weights_file(base_dirs, llama_adapter_dir, damage):
    path = llama_adapter_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "garbage_header":
        data = data[:8] + b"}{not json" + data[18:]
    else:
        data = b""
    path.write_bytes(data)
    _check_failed_load_adapter(base_dirs, llama_adapter_dir, ValueError, "not a readable safetensors file")
    _check_failed_from_pretrained(base_dirs, llama_adapter_dir, ValueError, "not a readable safetensors file")


def test_adapter_for_different_hidden_size(base_dirs, tmp_path):
    other = get_lora_model(hf_models.tiny_llama(hidden_size=48), _dl_config("llama", "plain"), seed=0)
    other.save_pretrained(tmp_path)
    _check_failed_load_adapter(base_dirs, tmp_path, ConfigError, r"in_features 48|shape")
    _check_failed_from_pretrained(base_dirs, tmp_path, ConfigError, r"in_features 48|shape")


def test_adapter_with_extra_layer(base_dirs, tmp_path):
    """Saved for a 3-layer model: layer 2's tensors have no place in the 2-layer model."""
    other = get_lora_model(hf_models.tiny_llama(num_hidden_layers=3), _dl_config("llama", "plain"), seed=0)
    other.save_pretrained(tmp_path)
    _check_failed_load_adapter(base_dirs, tmp_path, ConfigError, r"unexpected.*layers\.2\.")
    _check_failed_from_pretrained(base_dirs, tmp_path, ConfigError, r"unexpected.*layers\.2\.")


def test_adapter_file_missing_a_tensor(base_dirs, llama_adapter_dir):
    path = llama_adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, path, metadata={"format": "pt"})
    _check_failed_load_adapter(base_dirs, llama_adapter_dir, ConfigError, rf"missing.*{dropped}")
    _check_failed_from_pretrained(base_dirs, llama_adapter_dir, ConfigError, rf"missing.*{dropped}")


def test_adapter_for_other_architecture(base_dirs, tmp_path):
    """A GPT-2 adapter (targets c_attn, ...) matches no module of the llama model."""
    theirs = peft.get_peft_model(fresh(base_dirs, "gpt2"), _peft_config("gpt2", "plain", target_modules=["c_attn"]))
    theirs.save_pretrained(str(tmp_path))
    _check_failed_load_adapter(base_dirs, tmp_path, ConfigError, "matched no module")
    _check_failed_from_pretrained(base_dirs, tmp_path, ConfigError, "matched no module")


def test_load_adapter_existing_name_refused(base_dirs, llama_adapter_dir):
    host = _host(base_dirs)
    snap = _Snapshot(host)
    with pytest.raises(ValueError, match="already exists"):
        host.load_adapter(llama_adapter_dir, "default")
    snap.check()
