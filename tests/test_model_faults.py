"""A failed call leaves the model exactly as it was (issue #14 item 6); an unconverted
PiSSA / OLoRA / LoftQ / CorDA adapter reloads to the trained model or is refused (item 7); a
frozen load is in eval mode (item 8). Tiny HF models, and megatron at TP=2.

Failures are injected where they hurt most: in the middle of the injection loop (after some
layers were wrapped and, for PiSSA, base weights rewritten), in the modules_to_save wrapping,
and in loads (a missing tensor after the PiSSA residual was computed)."""

from __future__ import annotations

import json
import os
import re
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dist_lora import ConfigError, CordaConfig, LoraConfig, LoraModel, get_lora_model  # noqa: E402
from dist_lora.init import preprocess_corda  # noqa: E402
from dist_lora.layers import LoraLayer, LoraLinear  # noqa: E402
from dist_lora.modules_to_save import ModulesToSaveWrapper  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.harness import run_distributed  # noqa: E402

ids = hf_models.sample_ids()
WEIGHTS = "adapter_model.safetensors"


def _cfg(**kw) -> LoraConfig:
    base = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    base.update(kw)
    return LoraConfig(**base)


class _State:
    """What a failed call must not change: module tree, parameter values and flags, modes,
    layer indices and the layer count in the config, and (for a LoraModel) its bookkeeping."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.value = self._take()

    def _take(self) -> dict:
        m = self.model
        value = dict(
            modules=[(n, type(x), id(x)) for n, x in m.named_modules()],
            params={n: (p.detach().clone(), p.requires_grad, p.dtype) for n, p in m.named_parameters()},
            training=[x.training for x in m.modules()],
            layer_idx=[getattr(x, "layer_idx", None) for x in m.modules()],
            eigens=[id(getattr(x, "corda_eigens", None)) for x in m.modules()],
        )
        config = getattr(m, "config", None)
        value["num_layers"] = getattr(config, "num_hidden_layers", None)
        if isinstance(m, LoraModel):
            value.update(
                configs=dict(m.peft_config), active=m.active_adapters, targeted=list(m.targeted_module_names),
                layer_adapters=[(n, sorted(x.r), x.active_adapters) for n, x in m.lora_layers()],
                wrappers=[(sorted(w.modules_to_save), w.active_adapter) for w in m.model.modules()
                          if isinstance(w, ModulesToSaveWrapper)],
            )
        return value

    def check(self) -> None:
        now = self._take()
        assert now.keys() == self.value.keys()
        for key in now:
            if key != "params":
                assert now[key] == self.value[key], key
        assert now["params"].keys() == self.value["params"].keys()
        for name, (value, flag, dtype) in self.value["params"].items():
            got, got_flag, got_dtype = now["params"][name]
            assert (got_flag, got_dtype) == (flag, dtype), name
            assert torch.equal(got, value), name  # bit for bit: rewritten weights come back exactly


def _fail_at(monkeypatch, cls, method: str, call: int) -> list:
    """Make the ``call``-th call of ``cls.method`` raise (the earlier ones run normally)."""
    original, calls = getattr(cls, method), []

    def failing(self, *args, **kwargs):
        calls.append(method)
        if len(calls) == call:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, failing)
    return calls


def _trainable_base() -> torch.nn.Module:
    base = hf_models.tiny_llama()
    base.train()  # a user's model in training mode, every parameter trainable
    assert all(p.requires_grad for p in base.parameters())
    return base


# --- item 6: rollback -------------------------------------------------------------------------


def _with_bad_pattern(config: LoraConfig) -> LoraConfig:
    # set after construction: the regex is only compiled when the pattern is applied (a config
    # validator may refuse it earlier; the model must be untouched either way)
    config.rank_pattern = {"q_proj(": 2}
    return config


def test_invalid_rank_pattern_leaves_the_model_untouched(tmp_path):
    base = _trainable_base()
    state = _State(base)
    with pytest.raises((re.error, ConfigError)):
        get_lora_model(base, _with_bad_pattern(_cfg()), seed=0)
    state.check()

    host = get_lora_model(hf_models.tiny_llama(), _cfg(modules_to_save=["lm_head"]), seed=0)
    state = _State(host)
    with pytest.raises((re.error, ConfigError)):
        host.add_adapter("other", _with_bad_pattern(_cfg(target_modules=["q_proj", "k_proj"])))
    state.check()

    # ... and from a loaded adapter_config.json
    get_lora_model(hf_models.tiny_llama(), _cfg(), seed=1).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rank_pattern": {"q_proj(": 2}}))
    base = _trainable_base()
    state = _State(base)
    with pytest.raises((re.error, ConfigError)):
        LoraModel.from_pretrained(base, tmp_path)
    state.check()
    state = _State(host)
    with pytest.raises((re.error, ConfigError)):
        host.load_adapter(tmp_path, "other")
    state.check()


@pytest.mark.parametrize("init", [False, "pissa"])
@pytest.mark.parametrize("call", [1, 4, 6])
def test_get_lora_model_failing_mid_injection_hands_back_the_model(monkeypatch, init, call):
    """6 targets: the failure comes after 0, 3 or 5 layers were wrapped (and, with PiSSA,
    their base weights rewritten)."""
    base = _trainable_base()
    state = _State(base)
    calls = _fail_at(monkeypatch, LoraLinear, "update_layer", call)
    with pytest.raises(RuntimeError, match="injected failure"):
        get_lora_model(base, _cfg(init_lora_weights=init, modules_to_save=["lm_head"]), seed=0)
    assert len(calls) == call
    state.check()
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in base.modules())


def test_add_adapter_failing_late_keeps_the_other_adapters(monkeypatch):
    """The new adapter goes into layers that already hold one (q_proj, lm_head's wrapper) and
    into new ones (k_proj); a failure in the modules_to_save step, after every LoRA layer was
    done, undoes all of it, and the name can be used again."""
    host = get_lora_model(hf_models.tiny_llama(), _cfg(modules_to_save=["lm_head"], bias="lora_only"), seed=0)
    host.add_adapter("third", _cfg(target_modules=["o_proj"]))
    host.disable_adapter_layers()
    host.enable_adapter_layers()
    out = hf_models.logits(host, ids)
    state = _State(host)
    config = _cfg(target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"], init_lora_weights="olora")
    calls = _fail_at(monkeypatch, ModulesToSaveWrapper, "add", 1)
    with pytest.raises(RuntimeError, match="injected failure"):
        host.add_adapter("second", config)
    assert calls
    state.check()
    torch.testing.assert_close(hf_models.logits(host, ids), out, atol=0, rtol=0)
    monkeypatch.undo()
    host.add_adapter("second", config)
    assert set(host.peft_config) == {"default", "third", "second"}


def test_rollback_blocks_nest(monkeypatch):
    """An inner failure (caught by the caller) undoes only the inner call; the outer block,
    failing later, undoes everything, including base weights rewritten in both."""
    host = get_lora_model(hf_models.tiny_llama(), _cfg(target_modules=["q_proj"]), seed=0)
    outer = _State(host)
    with pytest.raises(RuntimeError, match="outer failure"):
        with host.rollback_on_error():
            host.add_adapter("a", _cfg(target_modules=["k_proj", "q_proj"], init_lora_weights="pissa"))
            inner = _State(host)
            _fail_at(monkeypatch, LoraLinear, "update_layer", 3)
            with pytest.raises(RuntimeError, match="injected failure"):
                host.add_adapter("b", _cfg(target_modules=["q_proj", "o_proj"], init_lora_weights="olora"))
            inner.check()
            monkeypatch.undo()
            raise RuntimeError("outer failure")
    outer.check()


def test_layer_replication_is_undone(monkeypatch):
    base = _trainable_base()
    state = _State(base)
    _fail_at(monkeypatch, LoraLinear, "update_layer", 5)
    with pytest.raises(RuntimeError, match="injected failure"):
        get_lora_model(base, _cfg(layer_replication=[[0, 2], [1, 2]]), seed=0)
    state.check()
    assert len(base.model.layers) == 2


def _corda_prepared(config: LoraConfig) -> torch.nn.Module:
    """A tiny Llama after CorDA's data pass (two fixed batches)."""
    batches = [torch.randint(hf_models.VOCAB, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = hf_models.tiny_llama()
    preprocess_corda(model, config, run_model=lambda: [model(b) for b in batches])
    return model


def test_corda_data_survives_a_failed_injection(monkeypatch):
    """CorDA's init consumes each layer's covariance data: a failed injection puts it back,
    so the retry gives the adapter a first attempt would have."""
    config = _cfg(init_lora_weights="corda", corda_config=CordaConfig())
    prepared = lambda: _corda_prepared(config)  # noqa: E731

    base = prepared()
    state = _State(base)
    _fail_at(monkeypatch, LoraLinear, "update_layer", 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        get_lora_model(base, config, seed=0)
    state.check()
    monkeypatch.undo()
    retried = hf_models.logits(get_lora_model(base, config, seed=0), ids)
    torch.testing.assert_close(retried, hf_models.logits(get_lora_model(prepared(), config, seed=0), ids), atol=0, rtol=0)


@pytest.mark.parametrize("damage", ["missing_tensor", "wrong_shape", "no_weights_file"])
def test_failed_from_pretrained_keeps_flags_modes_and_weights(tmp_path, damage):
    """A PiSSA adapter: its init (and base rewrite) is redone before the weights are checked."""
    source = get_lora_model(hf_models.tiny_llama(), _cfg(init_lora_weights="pissa", modules_to_save=["lm_head"]), seed=0)
    source.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS
    tensors = load_file(path)
    if damage == "missing_tensor":
        del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    elif damage == "wrong_shape":
        key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
        tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    if damage == "no_weights_file":
        os.remove(path)
    base = _trainable_base()
    state = _State(base)
    with pytest.raises((ConfigError, FileNotFoundError)):
        LoraModel.from_pretrained(base, tmp_path)
    state.check()

    host = get_lora_model(hf_models.tiny_llama(), _cfg(target_modules=["k_proj"]), seed=0)
    state = _State(host)
    with pytest.raises((ConfigError, FileNotFoundError)):
        host.load_adapter(tmp_path, "other")
    state.check()


# --- item 7: unconverted adapters of base-rewriting inits ------------------------------------------


def _perturb(model) -> None:
    """Stand-in for training: move every factor."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _trained(tmp_path, config: LoraConfig, base=None):
    model = get_lora_model(base if base is not None else hf_models.tiny_llama(), config, seed=0)
    _perturb(model)
    expected = hf_models.logits(model.eval(), ids)
    assert (expected - hf_models.logits(hf_models.tiny_llama(), ids)).abs().max() > 1e-2
    model.save_pretrained(tmp_path)  # not converted: trained factors for the rewritten base
    return expected


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_pissa_olora_adapter_reloads_as_trained_like_peft(tmp_path, init):
    expected = _trained(tmp_path, _cfg(init_lora_weights=init))
    ours = LoraModel.from_pretrained(hf_models.tiny_llama(), tmp_path)
    torch.testing.assert_close(hf_models.logits(ours, ids), expected, atol=1e-5, rtol=0)
    theirs = peft.PeftModel.from_pretrained(hf_models.tiny_llama(), str(tmp_path))
    torch.testing.assert_close(hf_models.logits(theirs, ids), expected, atol=1e-5, rtol=0)

    # load_adapter redoes it too (and rewrites the shared base, as PEFT does)
    host = get_lora_model(hf_models.tiny_llama(), _cfg(target_modules=["k_proj"]), seed=3)
    host.load_adapter(tmp_path, "trained")
    host.set_adapter("trained")
    torch.testing.assert_close(hf_models.logits(host, ids), expected, atol=1e-5, rtol=0)


def test_unconverted_pissa_niter_reloads_with_the_training_seed(tmp_path):
    expected = _trained(tmp_path, _cfg(init_lora_weights="pissa_niter_1"))
    with pytest.warns(UserWarning, match="seed"):
        ours = LoraModel.from_pretrained(hf_models.tiny_llama(), tmp_path, seed=0)
    torch.testing.assert_close(hf_models.logits(ours, ids), expected, atol=1e-5, rtol=0)


def test_unconverted_loftq_adapter_reloads_as_trained(tmp_path):
    pytest.importorskip("bitsandbytes")
    from dist_lora import LoftQConfig

    expected = _trained(tmp_path, _cfg(init_lora_weights="loftq", loftq_config=LoftQConfig()))
    ours = LoraModel.from_pretrained(hf_models.tiny_llama(), tmp_path)
    torch.testing.assert_close(hf_models.logits(ours, ids), expected, atol=1e-5, rtol=0)


def test_unconverted_corda_adapter_is_refused_like_peft_unless_prepared(tmp_path):
    config = _cfg(init_lora_weights="corda", corda_config=CordaConfig())
    prepared = lambda: _corda_prepared(config)  # noqa: E731

    expected = _trained(tmp_path, config, base=prepared())
    base = _trainable_base()
    state = _State(base)
    with pytest.raises(ConfigError, match="init_lora_weights='corda'.*path_initial_model_for_weight_conversion"):
        LoraModel.from_pretrained(base, tmp_path)
    state.check()
    with pytest.raises(ValueError, match="preprocess_corda"):  # PEFT refuses too
        peft.PeftModel.from_pretrained(hf_models.tiny_llama(), str(tmp_path))
    # with the data pass redone on the original model (PEFT's requirement) it loads as trained
    ours = LoraModel.from_pretrained(prepared(), tmp_path)
    torch.testing.assert_close(hf_models.logits(ours, ids), expected, atol=1e-5, rtol=0)


# --- item 8: a frozen load is in eval mode --------------------------------------------------------


def test_frozen_load_is_in_eval_mode_like_peft(tmp_path):
    source = get_lora_model(hf_models.tiny_llama(), _cfg(lora_dropout=0.5, init_lora_weights=True), seed=0)
    _perturb(source)
    expected = hf_models.logits(source.eval(), ids)
    source.save_pretrained(tmp_path)

    ours = LoraModel.from_pretrained(_trainable_base(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(_trainable_base(), str(tmp_path))
    assert (ours.training, theirs.training) == (False, False)
    assert not any(m.training for m in ours.modules())
    torch.testing.assert_close(hf_models.logits(ours, ids), expected, atol=1e-6, rtol=0)  # no dropout

    trainable = LoraModel.from_pretrained(_trainable_base(), tmp_path, is_trainable=True)
    assert trainable.model.training  # left as the caller had it, as PEFT does

    for is_trainable in (False, True):
        host = get_lora_model(_trainable_base(), _cfg(target_modules=["k_proj"]), seed=0)
        peft_host = peft.get_peft_model(_trainable_base(), peft.LoraConfig(r=2, target_modules=["k_proj"]))
        host.load_adapter(tmp_path, "loaded", is_trainable=is_trainable)
        peft_host.load_adapter(str(tmp_path), "loaded", is_trainable=is_trainable)
        assert host.training == peft_host.training == is_trainable


# --- megatron at TP=2 ------------------------------------------------------------------------


def _gpt(tp: int):
    from tests.models import build_tiny_gpt, tiny_gpt_config

    torch.manual_seed(0)
    return build_tiny_gpt(tiny_gpt_config(tp, False, num_attention_heads=8, num_query_groups=4))


def _megatron_trained(out: str) -> float:
    """TP=1: a PiSSA adapter, 'trained', saved unconverted; returns its loss."""
    from tests.models import gpt_loss, random_batch

    model = get_lora_model(_gpt(1), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"), seed=0)
    _perturb(model)
    model.save_pretrained(out)
    with torch.no_grad():
        return gpt_loss(model, *random_batch(0)).item()


def _megatron_faults(good: str, damaged: str) -> dict:
    from dist_lora.layers.base import LoraLayer as Base
    from tests.models import gpt_loss, random_batch

    base = _gpt(2)
    state = _State(base)
    with pytest.MonkeyPatch.context() as patch:
        calls = _fail_at(patch, Base, "update_layer", 4)  # after 3 layers' PiSSA (collectives and rewrites) succeeded
        with pytest.raises(RuntimeError, match="injected failure"):
            get_lora_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"), seed=0)
    state.check()
    with pytest.raises(ConfigError, match="missing"):
        LoraModel.from_pretrained(base, damaged)
    state.check()
    loaded = LoraModel.from_pretrained(base, good)
    assert all(layer.tp_size == 2 for _, layer in loaded.lora_layers())
    with torch.no_grad():
        return {"loss": gpt_loss(loaded, *random_batch(0)).item(), "calls": len(calls)}


def test_megatron_tp2_rollback_and_pissa_reload(tmp_path):
    good, damaged = str(tmp_path / "good"), str(tmp_path / "damaged")
    [expected] = run_distributed(_megatron_trained, 1, tp=1, args=(good,))
    shutil.copytree(good, damaged)
    tensors = load_file(os.path.join(damaged, WEIGHTS))
    del tensors["base_model.model.decoder.layers.1.mlp.linear_fc2.lora_A.weight"]
    save_file(tensors, os.path.join(damaged, WEIGHTS), metadata={"format": "pt"})
    results = run_distributed(_megatron_faults, 2, tp=2, args=(good, damaged))
    for result in results:
        assert result["calls"] == 4
        assert result["loss"] == pytest.approx(expected, abs=1e-5)


# --- DeepSpeed ZeRO-3 ------------------------------------------------------------------------


def _zero3_rollback() -> dict:
    from dist_lora.parallel import zero
    from tests.test_deepspeed_zero import build_base, ds_config

    base = build_base(3, ds_config(3))
    weights = zero.full_tensors(dict(base.named_parameters()))
    modules = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.MonkeyPatch.context() as patch:
        calls = _fail_at(patch, LoraLinear, "update_layer", 5)  # after 4 layers' PiSSA rewrote their (partitioned) weights
        with pytest.raises(RuntimeError, match="injected failure"):
            get_lora_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"), seed=0)
    after = zero.full_tensors(dict(base.named_parameters()))
    return {
        "same_weights": after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items()),
        "same_modules": [(n, type(m)) for n, m in base.named_modules()] == modules,
        "still_partitioned": all(p.data.numel() == 0 for p in base.parameters()),
        "calls": len(calls),
    }


def test_zero3_partitioned_weights_are_restored():
    import tests.test_deepspeed_zero  # noqa: F401  (prepares DeepSpeed once, before the ranks fork)

    for result in run_distributed(_zero3_rollback, 2):
        assert result == {"same_weights": True, "same_modules": True, "still_partitioned": True, "calls": 5}
