"""LoraConfig and targeting against the real PEFT 0.21.2: same result or same refusal.

- every field of PEFT's LoraConfig is a LoraConfig field here, with PEFT's default, so any PEFT
  adapter_config.json parses; a file setting a feature dist_lora lacks is refused, naming the
  file and the field; an init method dist_lora lacks is read, and refused for a new adapter;
- ``layers_pattern`` / ``layers_to_transform``: the same configs are accepted and the same
  modules matched (an empty pattern means "any ``<name>.<index>.``", which needs a parent
  module before the list);
- ``init_lora_weights``: "OLoRA" / "Gaussian" are read case-insensitively as PEFT does; the
  spellings PEFT fails on ("PiSSA") are refused up front;
- deliberate differences (documented here, not hidden): text in a boolean field is refused
  (PEFT reads "false" as true), and a ``pathlib.Path`` in CordaConfig is written as a string
  (PEFT cannot save it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from peft.tuners.lora import config as peft_lora_config  # noqa: E402
from torch import nn  # noqa: E402

from dist_lora import get_lora_model  # noqa: E402
from dist_lora.config import CONFIG_NAME, NOT_YET_SUPPORTED, ConfigError, LoraConfig  # noqa: E402
from dist_lora.targeting import find_targets  # noqa: E402

# adapter_config.json keys of PEFT's that describe the file, not the adapter (dropped on load).
PEFT_METADATA = {"peft_version"}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_saved(tmp_path, **kwargs) -> dict:
    """Save ``peft.LoraConfig(**kwargs)`` with PEFT into tmp_path; return the JSON it wrote."""
    _quiet(peft.LoraConfig(**kwargs).save_pretrained, str(tmp_path))
    return json.loads((tmp_path / CONFIG_NAME).read_text())


# --------------------------------------------------------------------------------------------
# every PEFT field
# --------------------------------------------------------------------------------------------


def test_every_peft_field_is_a_field_here_with_peft_default():
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init}
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    assert theirs - PEFT_METADATA <= ours, sorted(theirs - PEFT_METADATA - ours)
    assert ours <= theirs, sorted(ours - theirs)  # nothing of our own in a PEFT file
    peft_defaults = _quiet(peft.LoraConfig().to_dict)
    for key, value in LoraConfig().to_dict().items():
        expected = getattr(peft_defaults[key], "value", peft_defaults[key])  # PeftType.LORA -> "LORA"
        assert value == expected, key


def test_peft_default_file_loads_and_round_trips(tmp_path):
    written = _peft_saved(tmp_path / "peft")
    ours = LoraConfig.from_pretrained(tmp_path / "peft")
    assert set(ours.to_dict()) == set(written) - PEFT_METADATA
    for key, value in ours.to_dict().items():
        assert value == written[key], key
    ours.save_pretrained(tmp_path / "ours")
    back = _quiet(peft.LoraConfig.from_pretrained, str(tmp_path / "ours"))
    assert _quiet(back.to_dict) == _quiet(peft.LoraConfig.from_pretrained(str(tmp_path / "peft")).to_dict)


# One non-default value per PEFT feature dist_lora does not implement.
_UNSUPPORTED = [
    ("trainable_token_indices", [0, 3]),
    ("ensure_weight_tying", True),
    ("use_qalora", True),
    ("alora_invocation_tokens", [5, 6]),
    ("lora_ga_config", peft_lora_config.LoraGAConfig()),
    ("velora_config", peft_lora_config.VeloraConfig()),
    ("monteclora_config", peft_lora_config.MontecloraConfig()),
    ("use_bdlora", peft_lora_config.BdLoraConfig()),
    ("arrow_config", peft_lora_config.ArrowConfig()),
    ("kasa_config", peft_lora_config.KasaConfig()),
]


def test_unsupported_list_covers_the_cases_here():
    assert {name for name, _ in _UNSUPPORTED} == set(NOT_YET_SUPPORTED)


@pytest.mark.parametrize("name, value", _UNSUPPORTED, ids=[n for n, _ in _UNSUPPORTED])
def test_peft_file_with_unsupported_feature_is_refused_naming_file_and_field(tmp_path, name, value):
    _peft_saved(tmp_path, target_modules=["q_proj"], task_type="CAUSAL_LM", **{name: value})
    with pytest.raises(ConfigError, match=rf"does not support: {name}=") as info:
        LoraConfig.from_pretrained(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / CONFIG_NAME}: ")
    assert NOT_YET_SUPPORTED[name] in str(info.value)


@pytest.mark.parametrize("init", ["orthogonal", "mica", "lora_ga"])
def test_peft_file_with_unsupported_init_loads_and_new_adapters_refuse_it(tmp_path, init):
    # The init method decides only a new adapter's first weights (PEFT's MiCA variant computes
    # plain LoRA): the file's config is read; starting a new adapter with it is refused.
    _peft_saved(tmp_path, target_modules=["q_proj"], init_lora_weights=init)
    config = LoraConfig.from_pretrained(tmp_path)
    assert config.init_lora_weights == init
    model = _Two()
    with pytest.raises(NotImplementedError, match=rf"init_lora_weights='{init}' is not yet supported"):
        get_lora_model(model, config)
    assert type(model.q_proj) is nn.Linear


# --------------------------------------------------------------------------------------------
# layers_pattern / layers_to_transform
# --------------------------------------------------------------------------------------------


def _block() -> nn.ModuleDict:
    return nn.ModuleDict({"q_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4)})


class TopLevel(nn.Module):  # "layers.0.q_proj": the list has no parent module
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_block() for _ in range(2))


class Nested(nn.Module):  # "model.layers.0.q_proj"
    def __init__(self):
        super().__init__()
        self.model = TopLevel()


class GptStyle(nn.Module):  # "transformer.h.0.q_proj"
    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList(_block() for _ in range(2))


class MoE(nn.Module):  # "model.layers.0.experts.1.q_proj": the first index is the layer's
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList(_block() for _ in range(2))}) for _ in range(2)
        )


def _outcome(run):
    """The set of targeted names, or "refused" if the call raised ValueError (ConfigError is one)."""
    try:
        return set(run())
    except ValueError:
        return "refused"


def _refused(fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
    except ValueError:
        return True
    return False


def _peft_targets(model: nn.Module, **kwargs):
    pm = _quiet(lambda: peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)))
    return {n for n, m in pm.base_model.model.named_modules() if isinstance(m, PeftLoraLayer)}


PATTERNS = [None, "", [], "layers", ["layers"], "h", ["h", "layers"], "experts", [""], "model.layers"]


@pytest.mark.parametrize("model_cls", [TopLevel, Nested, GptStyle, MoE])
@pytest.mark.parametrize("layers_pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("layers", [[0], 1])
def test_layers_pattern_matches_the_same_modules_as_peft(model_cls, layers_pattern, layers):
    model = model_cls()
    kwargs = dict(target_modules=["q_proj"], layers_to_transform=layers, layers_pattern=layers_pattern)
    ours = _outcome(lambda: find_targets(model, LoraConfig(**kwargs)))
    assert ours == _outcome(lambda: _peft_targets(model, **kwargs))


def test_layers_pattern_needs_a_parent_module_only_without_a_pattern():
    # Without a pattern PEFT looks for "<parent>.<list>.<index>.": a list at the top of the
    # model has no parent, so nothing matches; naming the list matches it.
    top = TopLevel()
    with pytest.raises(ConfigError, match=r"matched no module"):
        find_targets(top, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0]))
    assert find_targets(top, LoraConfig(target_modules=["q_proj"], layers_to_transform=[0],
                                        layers_pattern="layers")) == ["layers.0.q_proj"]
    assert find_targets(Nested(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[0])) == [
        "model.layers.0.q_proj"]


@pytest.mark.parametrize("target_modules", [["q_proj"], r".*q_proj"])
@pytest.mark.parametrize("layers_pattern", [None, "", [], "layers", ["h", "layers"]], ids=repr)
@pytest.mark.parametrize("layers", [None, [], [0]], ids=repr)
def test_layers_options_accepted_and_refused_as_peft(target_modules, layers_pattern, layers):
    kwargs = dict(target_modules=target_modules, layers_pattern=layers_pattern, layers_to_transform=layers)
    accepted = not _refused(LoraConfig, **kwargs)
    assert accepted == (not _refused(_quiet, peft.LoraConfig, **kwargs))
    if accepted:  # and what is accepted targets the same modules
        model = Nested()
        assert _outcome(lambda: find_targets(model, LoraConfig(**kwargs))) == _outcome(
            lambda: _peft_targets(model, **kwargs))


# --------------------------------------------------------------------------------------------
# init_lora_weights spellings
# --------------------------------------------------------------------------------------------


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(16, 12)
        self.v_proj = nn.Linear(16, 12)


def _factors_ours(init):
    model = get_lora_model(_Two(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init),
                           seed=0)
    layer = dict(model.lora_layers())["q_proj"]
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def _factors_peft(init):
    pm = _quiet(peft.get_peft_model, _Two(),
                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init))
    layer = pm.base_model.model.q_proj
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


@pytest.mark.parametrize("spelling", ["OLoRA", "OLORA"])
def test_olora_spelling_gives_peft_olora(spelling):
    a, b = _factors_ours(spelling)
    pa, pb = _factors_peft(spelling)
    torch.testing.assert_close(a, pa, atol=1e-5, rtol=0)  # OLoRA is a QR of the weight: no randomness
    torch.testing.assert_close(b, pb, atol=1e-5, rtol=0)
    ref_a, _ = _factors_ours("olora")
    assert torch.equal(a, ref_a)


def test_gaussian_spelling_accepted_as_peft():
    a, b = _factors_ours("Gaussian")
    assert a.abs().sum() > 0 and b.abs().sum() == 0  # gaussian A, zero B (PEFT: the same rule)
    pa, pb = _factors_peft("Gaussian")
    assert pa.abs().sum() > 0 and pb.abs().sum() == 0
    assert pa.std() == pytest.approx(0.25, rel=0.5) and a.std() == pytest.approx(0.25, rel=0.5)  # std 1/r


@pytest.mark.parametrize("spelling", ["PiSSA", "EVA", "LoftQ", "CorDA"])
def test_spellings_peft_fails_on_are_refused_up_front(spelling):
    with pytest.raises(ValueError):  # PEFT: "Unknown initialization" when it builds the layer
        _peft_targets(_Two(), target_modules=["q_proj"], init_lora_weights=spelling)
    with pytest.raises(ConfigError, match=rf"write {spelling.lower()!r}"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights=spelling)


# --------------------------------------------------------------------------------------------
# deliberate differences
# --------------------------------------------------------------------------------------------


def test_text_boolean_is_true_in_peft_and_refused_here():
    pm = _quiet(peft.get_peft_model, _Two(),
                peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"], use_rslora="false"))
    assert pm.base_model.model.q_proj.scaling["default"] == 16 / math.sqrt(16)  # 4.0, read as rslora
    with pytest.raises(ConfigError, match=r"use_rslora must be True or False, got 'false'"):
        LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"], use_rslora="false")


def test_corda_path_is_saved_as_a_string_peft_reads(tmp_path):
    path = pathlib.Path(tmp_path) / "corda_cache.pt"
    with pytest.raises(TypeError):  # PEFT keeps the Path and cannot write it
        _peft_saved(tmp_path / "peft", init_lora_weights="corda",
                    corda_config=peft_lora_config.CordaConfig(cache_file=path))
    LoraConfig(init_lora_weights="corda", corda_config={"cache_file": path}).save_pretrained(tmp_path / "ours")
    theirs = _quiet(peft.LoraConfig.from_pretrained, str(tmp_path / "ours"))
    assert theirs.corda_config.cache_file == str(path)
