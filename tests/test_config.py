"""LoraConfig: validation, megatron_config handling, PEFT-compatible JSON round trip, patterns.

PEFT 0.21.2 is the behavioural reference: configs are exchanged with the real
``peft.LoraConfig`` and the rank/alpha pattern rule is compared with PEFT's own helper.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import warnings

import pytest
import torch
from torch import nn

from dist_lora.config import (
    CONFIG_NAME,
    ConfigError,
    CordaConfig,
    EvaConfig,
    LoftQConfig,
    LoraConfig,
    LoraRuntimeConfig,
)
from dist_lora.config_rules import import_megatron_core

peft = pytest.importorskip("peft")


# --------------------------------------------------------------------------------------------
# rank / alpha / dropout / bias
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -1, 2.0, "8", None, True, False])
def test_bad_r(r):
    with pytest.raises(ConfigError, match=r"^r must be an integer >= 1, got "):
        LoraConfig(r=r)


@pytest.mark.parametrize("r", [1, 8, 256])
def test_good_r(r):
    assert LoraConfig(r=r).r == r


@pytest.mark.parametrize("rank", [0, -3, 1.5, True])
def test_bad_rank_pattern_value(rank):
    with pytest.raises(ConfigError, match=r"rank_pattern\['q_proj'\] must be an integer >= 1"):
        LoraConfig(rank_pattern={"v_proj": 4, "q_proj": rank})


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "16", None, True])
def test_bad_alpha(alpha):
    with pytest.raises(ConfigError, match=r"lora_alpha must be a finite number"):
        LoraConfig(lora_alpha=alpha)
    with pytest.raises(ConfigError, match=r"alpha_pattern\['o_proj'\] must be a finite number"):
        LoraConfig(alpha_pattern={"o_proj": alpha})


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_bad_dropout(p):
    with pytest.raises(ConfigError, match=r"lora_dropout must be in \[0, 1\)"):
        LoraConfig(lora_dropout=p)


@pytest.mark.parametrize("p", [0, 0.0, 0.1, 0.999])
def test_good_dropout(p):
    assert LoraConfig(lora_dropout=p).lora_dropout == p


@pytest.mark.parametrize("bias", ["None", "some", "", None, True])
def test_bad_bias(bias):
    with pytest.raises(ConfigError, match=r"bias must be 'none', 'all' or 'lora_only'"):
        LoraConfig(bias=bias)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_good_bias(bias):
    assert LoraConfig(bias=bias).bias == bias


# --------------------------------------------------------------------------------------------
# init_lora_weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [True, False, "gaussian", "eva", "olora", "pissa", "corda", "pissa_niter_0", "pissa_niter_16", "pissa_niter_100"],
)
def test_init_lora_weights_accepted(value):
    assert LoraConfig(init_lora_weights=value).init_lora_weights == value


@pytest.mark.parametrize("value", ["pissa_niter_-1", "pissa_niter_abc", "pissa_niter_", "pissa_niter_1.5", "pissa_niter_²"])
def test_init_lora_weights_bad_niter(value):
    with pytest.raises(ConfigError, match=r"number of subspace iterations must be a non-negative integer"):
        LoraConfig(init_lora_weights=value)


# value -> (seeded, weight_driven, data_driven, rewrites_base, convertible, supported)
INIT_KINDS = {
    True: (True, False, False, False, False, True),
    False: (True, False, False, False, False, True),
    "gaussian": (True, False, False, False, False, True),
    "eva": (False, False, True, False, False, True),
    "pissa": (False, True, False, True, True, True),
    "pissa_niter_4": (False, True, False, True, True, True),
    "olora": (False, True, False, True, True, True),
    "corda": (False, False, True, True, True, True),
    "loftq": (False, False, False, True, False, True),
    "orthogonal": (False, False, False, False, False, False),
    "mica": (False, False, False, False, False, False),
    "lora_ga": (False, False, False, False, False, False),
}


@pytest.mark.parametrize("value", list(INIT_KINDS), ids=str)
def test_init_kind_classifies_every_peft_init(value):
    from dist_lora.init_kind import INIT_METHODS, InitKind

    kind = InitKind.of(value)
    flags = (kind.seeded, kind.weight_driven, kind.data_driven, kind.rewrites_base, kind.convertible, kind.supported)
    assert flags == INIT_KINDS[value]
    assert set(INIT_KINDS) - {True, False, "pissa_niter_4"} == set(INIT_METHODS)
    config = LoraConfig(init_lora_weights=value, loftq_config={"loftq_bits": 4} if value == "loftq" else {})
    assert config.init_kind == kind and kind.value == value


def test_init_kind_reads_peft_spellings():
    from dist_lora.config import InitKind

    assert InitKind.of("OLoRA") == InitKind("olora", "olora")
    assert InitKind.of("pissa_niter_16") == InitKind("pissa_niter_16", "pissa", 16)
    with pytest.raises(ConfigError, match=r"init_lora_weights must be True, False, one of"):
        InitKind.of("kaiming")


# "Gaussian" left this list: PEFT reads "gaussian" case-insensitively (see test_init_lora_weights_case).
@pytest.mark.parametrize("value", ["kaiming", "", "pissa16", None, 1, 0, ["pissa"]])
def test_init_lora_weights_unknown(value):
    with pytest.raises(ConfigError, match=r"init_lora_weights must be True, False, one of .*'pissa_niter_<N>'"):
        LoraConfig(init_lora_weights=value)


def test_loftq_needs_loftq_config():
    with pytest.raises(ConfigError, match=r"init_lora_weights='loftq' needs loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    cfg = LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8})
    assert cfg.loftq_config == LoftQConfig(loftq_bits=8, loftq_iter=1)


# --------------------------------------------------------------------------------------------
# layers_to_transform / layers_pattern / target_modules types
# --------------------------------------------------------------------------------------------


def test_layers_pattern_without_layers_to_transform():
    with pytest.raises(ConfigError, match=r"layers_pattern is set but layers_to_transform is not"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_layers_to_transform_with_regex_target_modules():
    with pytest.raises(ConfigError, match=r"layers_to_transform cannot be used when target_modules is a regex"):
        LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(ConfigError, match=r"layers_to_transform cannot be used when target_modules is a regex"):
        LoraConfig(target_modules="all-linear", layers_to_transform=0)


@pytest.mark.parametrize("layers", [-1, [0, -2], [0, "1"], [True], 1.0])
def test_bad_layers_to_transform(layers):
    with pytest.raises(ConfigError, match=r"layers_to_transform must be non-negative integers"):
        LoraConfig(target_modules=["q_proj"], layers_to_transform=layers)


def test_layers_to_transform_and_pattern_accepted():
    cfg = LoraConfig(target_modules=["q_proj"], layers_to_transform=(0, 2), layers_pattern="layers")
    assert cfg.layers_to_transform == [0, 2]  # tuples normalised to lists
    assert LoraConfig(target_modules=["q_proj"], layers_to_transform=3).layers_to_transform == 3


@pytest.mark.parametrize("name", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("value", [["q_proj", 3], 5, {"q_proj": 1}])
def test_bad_module_lists(name, value):
    with pytest.raises(ConfigError, match=rf"{name} must be a string \(regex\) or a list of strings"):
        LoraConfig(**{name: value})


def test_sets_become_sorted_lists():
    cfg = LoraConfig(target_modules={"v_proj", "q_proj", "k_proj"}, exclude_modules=frozenset({"b", "a"}))
    assert cfg.target_modules == ["k_proj", "q_proj", "v_proj"]
    assert cfg.exclude_modules == ["a", "b"]


# --------------------------------------------------------------------------------------------
# megatron_core: never import an arbitrary module named in a config
# --------------------------------------------------------------------------------------------


@pytest.fixture
def trap_module(tmp_path, monkeypatch):
    """An importable module that records being imported (it must never be)."""
    name = "dist_lora_test_trap_module"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    yield name, marker
    sys.modules.pop(name, None)


def test_trap_module_is_really_importable(trap_module):
    # Guard for the tests below: the trap would have fired if it had been imported.
    import importlib

    name, marker = trap_module
    importlib.import_module(name)
    assert marker.exists()


@pytest.mark.parametrize("name", ["os", "subprocess", "megatron", "megatron.core.foo", "megatron.core "])
def test_import_megatron_core_refuses_off_allowlist(name):
    with pytest.raises(ConfigError, match=r"is not an allowed module; allowed: \['megatron.core'\]"):
        import_megatron_core(name)
    with pytest.raises(ConfigError, match=r"megatron_core=.* is not an allowed module"):
        LoraConfig(megatron_core=name)


def test_megatron_core_refused_without_importing(trap_module, tmp_path):
    name, marker = trap_module
    with pytest.raises(ConfigError, match=rf"megatron_core='{name}' is not an allowed module"):
        import_megatron_core(name)
    with pytest.raises(ConfigError, match=rf"megatron_core='{name}' is not an allowed module"):
        LoraConfig(megatron_core=name)
    # ... and from a config file (the attack vector of the PEFT report)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "megatron_core": name}))
    with pytest.raises(ConfigError, match=rf"megatron_core='{name}' is not an allowed module"):
        LoraConfig.from_pretrained(tmp_path / "adapter")
    assert name not in sys.modules
    assert not marker.exists()


def test_megatron_core_allowed():
    pytest.importorskip("megatron.core")
    import megatron.core

    assert import_megatron_core("megatron.core") is megatron.core
    assert LoraConfig(megatron_core="megatron.core").megatron_core == "megatron.core"
    assert LoraConfig(megatron_core=None).megatron_core is None


# --------------------------------------------------------------------------------------------
# sub-configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.01, float("nan")])
def test_eva_bad_tau(tau):
    with pytest.raises(ConfigError, match=r"EvaConfig.tau must be in \(0, 1\]"):
        EvaConfig(tau=tau)
    with pytest.raises(ConfigError, match=r"EvaConfig.tau must be in \(0, 1\]"):
        LoraConfig(init_lora_weights="eva", eva_config={"tau": tau})


@pytest.mark.parametrize("rho", [0.99, 0.0, -1.0, float("nan")])
def test_eva_bad_rho(rho):
    with pytest.raises(ConfigError, match=r"EvaConfig.rho must be >= 1.0"):
        EvaConfig(rho=rho)


def test_eva_good_values():
    assert EvaConfig(rho=1.0, tau=1.0).tau == 1.0
    cfg = LoraConfig(init_lora_weights="eva", eva_config={"rho": 1.5, "tau": 0.5})
    assert cfg.eva_config == EvaConfig(rho=1.5, tau=0.5)


@pytest.mark.parametrize("bits", [0, 1, 3, 16, "4", None])
def test_loftq_bad_bits(bits):
    with pytest.raises(ConfigError, match=r"loftq_bits must be 2, 4 or 8"):
        LoftQConfig(loftq_bits=bits)
    with pytest.raises(ConfigError, match=r"loftq_bits must be 2, 4 or 8"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": bits})


@pytest.mark.parametrize("it", [0, -1, 1.5])
def test_loftq_bad_iter(it):
    with pytest.raises(ConfigError, match=r"loftq_iter must be an integer >= 1"):
        LoftQConfig(loftq_iter=it)


def test_corda_bad_method():
    with pytest.raises(ConfigError, match=r"corda_method must be 'ipm' or 'kpm'"):
        CordaConfig(corda_method="xpm")


@pytest.mark.parametrize(
    "field_name, value, unknown",
    [
        ("loftq_config", {"loftq_bits": 4, "bits": 4}, "bits"),
        ("eva_config", {"rho": 2.0, "dataset": "x"}, "dataset"),
        ("corda_config", {"corda_method": "ipm", "method": "kpm"}, "method"),
        ("runtime_config", {"ephemeral_gpu_offload": False, "offload": True}, "offload"),
    ],
)
def test_sub_config_unknown_keys(field_name, value, unknown):
    kwargs = {field_name: value}
    if field_name == "loftq_config":
        kwargs["init_lora_weights"] = "loftq"
    with pytest.raises(ConfigError, match=rf"{field_name} has unknown keys \['{unknown}'\]"):
        LoraConfig(**kwargs)


def test_sub_config_wrong_type():
    with pytest.raises(ConfigError, match=r"eva_config must be a EvaConfig or a dict, got str"):
        LoraConfig(eva_config="eva")


def test_sub_configs_from_dicts():
    cfg = LoraConfig(corda_config={"corda_method": "kpm"}, runtime_config={"ephemeral_gpu_offload": True})
    assert cfg.corda_config == CordaConfig(corda_method="kpm")
    assert cfg.runtime_config == LoraRuntimeConfig(ephemeral_gpu_offload=True)


# --------------------------------------------------------------------------------------------
# lora_bias / layer_replication
# --------------------------------------------------------------------------------------------


def test_lora_bias_with_dora():
    with pytest.raises(ConfigError, match=r"lora_bias=True is not supported together with use_dora=True"):
        LoraConfig(lora_bias=True, use_dora=True)
    assert LoraConfig(lora_bias=True).lora_bias is True
    assert LoraConfig(lora_bias=True, init_lora_weights=False).lora_bias is True


@pytest.mark.parametrize("init", ["gaussian", "eva", "pissa_niter_4"])
def test_lora_bias_needs_default_init(init):
    # PEFT refuses this combination, so a config saved with it could not be loaded by PEFT.
    with pytest.raises(ValueError, match=r"lora_bias=True is only supported with init_lora_weights=True or False"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.LoraConfig(lora_bias=True, init_lora_weights=init)
    with pytest.raises(ConfigError, match=r"lora_bias=True is only supported with init_lora_weights=True or False"):
        LoraConfig(lora_bias=True, init_lora_weights=init)


@pytest.mark.parametrize("pair, shown", [([2, 2], r"\[2, 2\]"), ([3, 1], r"\[3, 1\]"), ((-1, 2), r"\[-1, 2\]")])
def test_layer_replication_bad_range(pair, shown):
    with pytest.raises(ConfigError, match=rf"layer_replication range {shown} needs 0 <= start < end"):
        LoraConfig(layer_replication=[[0, 2], pair])


@pytest.mark.parametrize(
    "pair, shown",
    [([0, 1, 2], r"\[0, 1, 2\]"), ([0, "2"], r"\[0, '2'\]"), ([0.0, 2], r"\[0.0, 2\]"), ([True, 2], r"\[True, 2\]"),
     (5, "5"), ("ab", "'ab'"), (None, "None")],
)
def test_layer_replication_bad_pair(pair, shown):
    with pytest.raises(ConfigError, match=rf"layer_replication range {shown} must be a pair of integers"):
        LoraConfig(layer_replication=[[0, 2], pair])


@pytest.mark.parametrize("value", [5, "0-2", {"0": 2}, 1.5])
def test_layer_replication_not_a_list(value):
    with pytest.raises(ConfigError, match=r"layer_replication must be a list of \[start, end\) pairs"):
        LoraConfig(layer_replication=value)


def test_layer_replication_good():
    cfg = LoraConfig(layer_replication=[(0, 2), (1, 3)])
    assert cfg.layer_replication == [[0, 2], [1, 3]]


# --------------------------------------------------------------------------------------------
# megatron_config
# --------------------------------------------------------------------------------------------


def test_megatron_config_dict_keeps_json_values_and_drops_runtime_objects():
    cfg = LoraConfig(
        megatron_config={
            "num_layers": 2,
            "hidden_size": 64,
            "sequence_parallel": False,
            "recompute_modules": ("core_attn",),
            "params_dtype": torch.bfloat16,
            "init_method": lambda t: t,
            "nan_value": float("nan"),
        }
    )
    mc = cfg.megatron_config
    assert set(mc) == {"num_layers", "hidden_size", "sequence_parallel", "recompute_modules"}
    json.dumps(cfg.to_dict())


def test_megatron_config_from_transformer_config(tmp_path):
    pytest.importorskip("megatron.core")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer import TransformerConfig

        tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True)
    cfg = LoraConfig(megatron_config=tc)
    mc = cfg.megatron_config
    assert type(mc) is dict
    assert mc["num_layers"] == 2 and mc["hidden_size"] == 64 and mc["num_attention_heads"] == 4
    assert mc["use_cpu_initialization"] is True
    for dropped in ("params_dtype", "init_method", "output_layer_init_method", "activation_func"):
        assert dropped not in mc
    text = json.dumps(cfg.to_dict())
    assert json.loads(text)["megatron_config"] == mc
    # round trip through a file (tuples in the dataclass must not break equality)
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("value", ["num_layers=2", 3, ["num_layers"]])
def test_megatron_config_bad_type(value):
    with pytest.raises(ConfigError, match=r"megatron_config must be a dict or a megatron TransformerConfig"):
        LoraConfig(megatron_config=value)


# --------------------------------------------------------------------------------------------
# JSON round trip, interoperability with real PEFT
# --------------------------------------------------------------------------------------------


def _rich_config() -> LoraConfig:
    return LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "o_proj"],
        exclude_modules=["lm_head"],
        lora_dropout=0.05,
        bias="lora_only",
        use_rslora=True,
        modules_to_save=["embed_tokens"],
        init_lora_weights="gaussian",
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        rank_pattern={"q_proj": 4, r"layers\.1\..*v_proj": 8},
        alpha_pattern={"o_proj": 7.5},
        megatron_config={"num_layers": 2, "hidden_size": 64},
        task_type="CAUSAL_LM",
        base_model_name_or_path="tiny/llama",
        runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=True),
    )


def test_json_round_trip(tmp_path):
    cfg = _rich_config()
    path = cfg.save_pretrained(tmp_path)
    assert path == str(tmp_path / CONFIG_NAME)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["peft_type"] == "LORA"
    assert "runtime_config" not in data
    assert "runtime_config" not in cfg.to_dict()
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.runtime_config == LoraRuntimeConfig()  # runtime-only, not carried over
    # no temporary files left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME]


def test_json_round_trip_with_sub_configs(tmp_path):
    cfg = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=2, loftq_iter=3),
                     eva_config=EvaConfig(rho=1.5), corda_config=CordaConfig(corda_method="kpm"))
    cfg.save_pretrained(tmp_path)
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.loftq_config == LoftQConfig(loftq_bits=2, loftq_iter=3)
    assert loaded.eva_config == EvaConfig(rho=1.5)
    assert loaded.corda_config == CordaConfig(corda_method="kpm")


def test_saved_file_loads_in_real_peft(tmp_path):
    cfg = _rich_config()
    cfg.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.LoraConfig)
    assert str(theirs.peft_type.value if hasattr(theirs.peft_type, "value") else theirs.peft_type) == "LORA"
    assert theirs.r == cfg.r
    assert theirs.lora_alpha == cfg.lora_alpha
    assert set(theirs.target_modules) == set(cfg.target_modules)
    assert set(theirs.exclude_modules) == set(cfg.exclude_modules)
    assert theirs.rank_pattern == cfg.rank_pattern
    assert theirs.alpha_pattern == cfg.alpha_pattern
    assert theirs.use_rslora is True
    assert theirs.lora_dropout == cfg.lora_dropout
    assert theirs.bias == cfg.bias
    assert theirs.init_lora_weights == cfg.init_lora_weights
    assert theirs.layers_to_transform == cfg.layers_to_transform
    assert theirs.layers_pattern == cfg.layers_pattern
    assert theirs.modules_to_save == cfg.modules_to_save
    assert theirs.megatron_config == cfg.megatron_config


@pytest.mark.parametrize("variant", ["eva", "lora_bias"])
def test_peft_saved_file_loads_here(tmp_path, variant):
    if variant == "eva":  # PEFT allows lora_bias only with init_lora_weights True/False
        extra = dict(init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.25, tau=0.5), lora_bias=False)
    else:
        extra = dict(init_lora_weights=False, lora_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            exclude_modules=r".*\.0\..*",
            lora_dropout=0.1,
            bias="all",
            use_rslora=True,
            modules_to_save=["lm_head"],
            rank_pattern={"q_proj": 2},
            alpha_pattern={"v_proj": 3},
            task_type="CAUSAL_LM",
            **extra,
        )
        theirs.save_pretrained(str(tmp_path))
    ours = LoraConfig.from_pretrained(tmp_path)
    assert ours.peft_type == "LORA"
    assert ours.r == 4
    assert ours.lora_alpha == 16
    assert set(ours.target_modules) == {"q_proj", "v_proj", "down_proj"}
    assert ours.exclude_modules == r".*\.0\..*"
    assert ours.lora_dropout == 0.1
    assert ours.bias == "all"
    assert ours.use_rslora is True
    assert ours.modules_to_save == ["lm_head"]
    assert ours.rank_pattern == {"q_proj": 2}
    assert ours.alpha_pattern == {"v_proj": 3}
    if variant == "eva":
        assert ours.init_lora_weights == "eva"
        assert ours.eva_config == EvaConfig(rho=1.25, tau=0.5)
        assert ours.lora_bias is False
    else:
        assert ours.init_lora_weights is False
        assert ours.eva_config is None
        assert ours.lora_bias is True
    assert ours.task_type == "CAUSAL_LM"
    # and back: what we write again is what PEFT wrote, for every field we share
    written = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key, value in ours.to_dict().items():
        if key == "target_modules":
            assert set(value) == set(written[key])
        else:
            assert value == written[key], key


@pytest.mark.parametrize(
    "key, value",
    [("use_qalora", True), ("trainable_token_indices", [1, 2]),
     ("alora_invocation_tokens", [5]), ("use_bdlora", {"nblocks": 2})],
)
def test_from_dict_refuses_peft_only_features(key, value):
    data = LoraConfig(target_modules=["q_proj"]).to_dict()
    data[key] = value
    with pytest.raises(ConfigError, match=rf"PEFT features dist_lora does not support: {key}="):
        LoraConfig.from_dict(data)


def test_from_dict_accepts_neutral_peft_only_keys():
    data = LoraConfig(target_modules=["q_proj"]).to_dict()
    data.update(use_qalora=False, target_parameters=None, trainable_token_indices=None, peft_version="0.21.2",
                qalora_group_size=16, ensure_weight_tying=False, arrow_config=None)
    assert LoraConfig.from_dict(data).to_dict() == LoraConfig(target_modules=["q_proj"]).to_dict()


def test_corrupt_json_names_the_file(tmp_path):
    (tmp_path / CONFIG_NAME).write_text('{"r": 8, "peft_type": "LORA",')
    with pytest.raises(ConfigError, match=r"adapter_config\.json is not valid JSON") as info:
        LoraConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


def test_binary_garbage_names_the_file(tmp_path):
    (tmp_path / CONFIG_NAME).write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ConfigError, match=r"adapter_config\.json is not valid JSON") as info:
        LoraConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


@pytest.mark.parametrize("content", ["[1, 2]", '"LORA"', "null", "3"])
def test_non_object_json_names_the_file(tmp_path, content):
    (tmp_path / CONFIG_NAME).write_text(content)
    with pytest.raises(ConfigError, match=r"is not a LoRA adapter config") as info:
        LoraConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


def test_other_peft_type_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "IA3", "r": 8}))
    with pytest.raises(ConfigError, match=r"is not a LoRA adapter config \(peft_type='IA3'\)"):
        LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"peft_type must be 'LORA'"):
        LoraConfig(peft_type="IA3")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json in"):
        LoraConfig.from_pretrained(tmp_path)


def test_to_dict_does_not_mutate_or_alias_the_config():
    cfg = _rich_config()
    before = copy.deepcopy(cfg)
    d = cfg.to_dict()
    assert cfg == before
    # the returned dict is the caller's to modify: the config must not change with it
    d["target_modules"].append("k_proj")
    d["rank_pattern"]["new"] = 1
    d["alpha_pattern"].clear()
    d["megatron_config"]["num_layers"] = 99
    d["modules_to_save"].append("lm_head")
    d["layers_to_transform"].append(5)
    assert cfg == before
    assert cfg.to_dict() == before.to_dict()


def test_post_init_does_not_mutate_caller_arguments():
    targets = ["v_proj", "q_proj"]
    ranks = {"q_proj": 4}
    mc = {"num_layers": 2, "params_dtype": torch.float32}
    loftq = {"loftq_bits": 4}
    replication = [(0, 2)]
    LoraConfig(target_modules=targets, rank_pattern=ranks, megatron_config=mc, init_lora_weights="loftq",
               loftq_config=loftq, layer_replication=replication)
    assert targets == ["v_proj", "q_proj"]
    assert ranks == {"q_proj": 4}
    assert mc == {"num_layers": 2, "params_dtype": torch.float32}
    assert loftq == {"loftq_bits": 4}
    assert replication == [(0, 2)]


def test_save_load_through_from_dict_is_independent():
    # peft_format builds the saved config with from_dict({**to_dict(), ...}); that copy must
    # not share containers with the live config.
    cfg = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    other = LoraConfig.from_dict({**cfg.to_dict(), "inference_mode": True})
    other.target_modules.append("v_proj")
    other.rank_pattern["v_proj"] = 3
    assert cfg.target_modules == ["q_proj"]
    assert cfg.rank_pattern == {"q_proj": 2}


# --------------------------------------------------------------------------------------------
# rank_pattern / alpha_pattern: PEFT's rule re.match(rf"(.*\.)?({key})$", name)
# --------------------------------------------------------------------------------------------

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.11.mlp.up_proj",
    "q_proj",
    "decoder.layers.0.self_attention.linear_qkv",
    "transformer.h.0.attn.c_attn",
]

PATTERNS = [
    {"q": 3},  # must NOT match q_proj as a substring
    {"proj": 3},  # nor a suffix that is not a whole dotted component
    {"q_proj": 3},
    {"self_attn.q_proj": 5, "q_proj": 3},
    {r"model.layers.1.*": 6},
    {r"layers\.1\..*": 6},  # must not match layers.11
    {r".*_proj": 2, "v_proj": 9},  # first match wins
    {"v_proj": 9, r".*_proj": 2},
    {"^model.layers.0.mlp.down_proj": 4, "linear_qkv": 12, "c_attn": 1},
    {"up_proj|down_proj": 7},
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "/".join(p))
def test_rank_and_alpha_for_follow_peft(pattern):
    from peft.utils.other import get_pattern_key

    r, alpha = 8, 16.0
    alpha_pattern = {k: float(v) * 2 for k, v in pattern.items()}
    cfg = LoraConfig(r=r, lora_alpha=alpha, rank_pattern=pattern, alpha_pattern=alpha_pattern)
    for name in NAMES:
        # PEFT: rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), r)
        expected_r = pattern.get(get_pattern_key(pattern.keys(), name), r)
        expected_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), alpha)
        assert cfg.rank_for(name) == expected_r, name
        assert cfg.alpha_for(name) == expected_alpha, name


def test_rank_for_explicit_expectations():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q": 1, "q_proj": 4, r"layers\.1\..*": 2},
                     alpha_pattern={"v_proj": 3})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.0.self_attn.k_proj") == 8
    assert cfg.rank_for("model.layers.1.self_attn.k_proj") == 2
    assert cfg.rank_for("model.layers.11.self_attn.k_proj") == 8
    assert cfg.rank_for("model.q") == 1
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 3
    assert cfg.alpha_for("model.layers.0.self_attn.xv_proj") == 16
    assert cfg.alpha_for("model.layers.0.self_attn.q_proj") == 16


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "q": nn.Linear(8, 8)})
            for _ in range(2)
        )


def test_rank_pattern_matches_real_peft_model():
    """The ranks PEFT gives each layer of a real model equal rank_for; same for scaling."""
    pattern = {"q": 1, r"layers\.1\.q_proj": 2, "v_proj": 3}
    alphas = {"q_proj": 12, "q": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            _Tiny(),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "q"], rank_pattern=pattern,
                            alpha_pattern=alphas),
        )
    ours = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "q"], rank_pattern=pattern,
                      alpha_pattern=alphas)
    from peft.tuners.lora import LoraLayer

    seen = 0
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            seen += 1
            assert module.r["default"] == ours.rank_for(name), name
            assert module.lora_alpha["default"] == ours.alpha_for(name), name
    assert seen == 6


# --------------------------------------------------------------------------------------------
# issue #14: real booleans, checked patterns / regexes / module lists, PEFT's init spellings
# --------------------------------------------------------------------------------------------

BOOL_FIELDS = [
    (LoraConfig, "use_rslora"), (LoraConfig, "use_dora"), (LoraConfig, "fan_in_fan_out"),
    (LoraConfig, "inference_mode"), (LoraConfig, "lora_bias"), (LoraConfig, "use_qalora"),
    (LoraConfig, "ensure_weight_tying"), (EvaConfig, "whiten"), (EvaConfig, "use_label_mask"),
    (EvaConfig, "adjust_scaling_factors"), (CordaConfig, "verbose"), (CordaConfig, "prune_temporary_fields"),
    (CordaConfig, "use_float16_for_covariance"), (LoraRuntimeConfig, "ephemeral_gpu_offload"),
    (LoraRuntimeConfig, "keep_gathered_input"),
]


@pytest.mark.parametrize("cls, name", BOOL_FIELDS, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", ["false", "true", "False", 0, 1, None])
def test_bool_fields_need_real_bools(cls, name, value):
    expected = rf"^{cls.__name__}\.{name} must be True or False, got {re.escape(repr(value))}"
    with pytest.raises(ConfigError, match=expected):
        cls(**{name: value})


def test_use_rslora_text_is_refused_not_read_as_true(tmp_path):
    # "false" is truthy: it used to give scaling alpha / sqrt(r) = 4.0 instead of alpha / r = 1.0.
    with pytest.raises(ConfigError, match=r"use_rslora must be True or False, got 'false'"):
        LoraConfig(r=16, lora_alpha=16, use_rslora="false")
    data = LoraConfig(r=16, lora_alpha=16).to_dict()
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**data, "use_rslora": "false"}))
    with pytest.raises(ConfigError, match=r"adapter_config\.json: LoraConfig\.use_rslora must be True or False"):
        LoraConfig.from_pretrained(tmp_path)
    assert LoraConfig(r=16, lora_alpha=16, use_rslora=False).use_rslora is False


@pytest.mark.parametrize("name", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("value", [[("q_proj", 4)], ["q_proj"], "q_proj", 4])
def test_pattern_must_be_a_dict(name, value, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{name} must be a dict \{{module-name regex: value\}}"):
        LoraConfig(**{name: value})
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**LoraConfig().to_dict(), name: value}))
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: {name} must be a dict") as info:
        LoraConfig.from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_NAME) in str(info.value)


@pytest.mark.parametrize("name", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key", ["q_proj(", "*proj", "[q", "(?i)q_proj"])  # the last fails in PEFT's (.*\.)?(key)$
def test_pattern_key_must_be_a_regex(name, key, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{name} key {re.escape(repr(key))} .*is not a valid regular expression"):
        LoraConfig(**{name: {"v_proj": 2, key: 4}})
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**LoraConfig().to_dict(), name: {key: 4}}))
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: {name} key .* is not a valid regular expression"):
        LoraConfig.from_pretrained(tmp_path)


def test_pattern_key_must_be_a_string():
    with pytest.raises(ConfigError, match=r"rank_pattern keys must be strings"):
        LoraConfig(rank_pattern={3: 4})


@pytest.mark.parametrize("name", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("regex", [r".*(q|v_proj", r"*_proj", r"model\.layers\.[0-"])
def test_invalid_module_regex(name, regex):
    with pytest.raises(ConfigError, match=rf"^{name}=.* is not a valid regular expression"):
        LoraConfig(**{name: regex})


def test_invalid_layers_pattern_regex():
    with pytest.raises(ConfigError, match=r"layers_pattern entry 'lay\(ers' is not a valid regular expression"):
        LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="lay(ers")


@pytest.mark.parametrize("value", [123, "lm_head", [1], ["lm_head", None], {"lm_head": 1}])
def test_modules_to_save_must_be_a_list_of_names(value):
    with pytest.raises(ConfigError, match=r"^modules_to_save must be a list of module names, e\.g\. \['lm_head'\]"):
        LoraConfig(modules_to_save=value)


@pytest.mark.parametrize("value, canonical", [("OLoRA", "olora"), ("OLORA", "olora"), ("Gaussian", "gaussian"),
                                              ("GAUSSIAN", "gaussian"), ("olora", "olora")])
def test_init_lora_weights_case(value, canonical, tmp_path):
    cfg = LoraConfig(init_lora_weights=value)
    assert cfg.init_lora_weights == canonical  # one spelling for the rest of the code
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["init_lora_weights"] == canonical


@pytest.mark.parametrize("value", ["PiSSA", "EVA", "LoftQ", "CorDA", "Pissa_niter_4"])
def test_init_lora_weights_case_sensitive_in_peft(value):
    with pytest.raises(ConfigError, match=rf"init_lora_weights={value!r}: PEFT reads this value case-sensitively.*"
                                          rf"write {value.lower()!r}"):
        LoraConfig(init_lora_weights=value)


@pytest.mark.parametrize("value", ["orthogonal", "lora_ga", "mica", "MiCA"])
def test_peft_init_methods_read_but_not_run(value):
    # a config may name them (they only decide a new adapter's first weights); get_lora_model refuses
    from dist_lora import get_lora_model

    cfg = LoraConfig(target_modules=["fc"], init_lora_weights=value)
    assert cfg.init_lora_weights == value.lower()
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 4))
    with pytest.raises(NotImplementedError, match=rf"init_lora_weights={value.lower()!r} is not yet supported"):
        get_lora_model(model, cfg)
    assert type(model.fc) is nn.Linear


def test_corda_paths_may_be_pathlike(tmp_path):
    corda = CordaConfig(cache_file=tmp_path / "cache.pt", covariance_file=tmp_path / "cov.pt")
    assert corda.cache_file == str(tmp_path / "cache.pt") and corda.covariance_file == str(tmp_path / "cov.pt")
    cfg = LoraConfig(init_lora_weights="corda", corda_config={"cache_file": tmp_path / "cache.pt"})
    cfg.save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path).corda_config.cache_file == str(tmp_path / "cache.pt")
    with pytest.raises(ConfigError, match=r"CordaConfig\.cache_file must be a file path or None, got 3"):
        CordaConfig(cache_file=3)


def _default_of(name):
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(LoraConfig)}[name]


def _set_value(name):
    return {"use_qalora": True, "ensure_weight_tying": True,
            "trainable_token_indices": [0, 1], "alora_invocation_tokens": [7]}.get(name, {"some": "config"})


def test_not_yet_supported_fields_exist_and_default_is_accepted():
    from dist_lora.config import NOT_YET_SUPPORTED

    assert {"trainable_token_indices", "ensure_weight_tying"} <= set(NOT_YET_SUPPORTED)
    for name in NOT_YET_SUPPORTED:
        assert getattr(LoraConfig(**{name: _default_of(name)}), name) == _default_of(name)


def test_not_yet_supported_fields_refused_when_set():
    from dist_lora.config import NOT_YET_SUPPORTED

    for name, feature in NOT_YET_SUPPORTED.items():
        with pytest.raises(ConfigError, match=rf"does not support: {name}=.*\({re.escape(feature)}\)\. "
                                              rf"Use {name}={re.escape(repr(_default_of(name)))}"):
            LoraConfig(**{name: _set_value(name)})


def test_qalora_group_size_checked_and_kept():
    assert LoraConfig(qalora_group_size=32).to_dict()["qalora_group_size"] == 32
    with pytest.raises(ConfigError, match=r"qalora_group_size must be an integer >= 1"):
        LoraConfig(qalora_group_size=0)


def test_task_type_checked_as_peft():
    assert LoraConfig(task_type=peft.TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"
    assert type(LoraConfig(task_type=peft.TaskType.SEQ_CLS).to_dict()["task_type"]) is str
    with pytest.raises(ConfigError, match=r"task_type must be None or one of \['SEQ_CLS'"):
        LoraConfig(task_type="CAUSAL")


@pytest.mark.parametrize("name", ["base_model_name_or_path", "revision"])
def test_metadata_strings_checked(name):
    with pytest.raises(ConfigError, match=rf"{name} must be a string or None"):
        LoraConfig(**{name: 3})


def test_integer_sub_config_fields_refuse_bools():
    with pytest.raises(ConfigError, match=r"loftq_iter must be an integer >= 1"):
        LoftQConfig(loftq_iter=True)
    with pytest.raises(ConfigError, match=r"EvaConfig\.label_mask_value must be an integer"):
        EvaConfig(label_mask_value=False)


def test_from_dict_needs_a_dict():
    with pytest.raises(ConfigError, match=r"an adapter config must be a dict, got list"):
        LoraConfig.from_dict([("r", 8)])


def test_unknown_key_refusal_names_the_file(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**LoraConfig().to_dict(), "use_future_lora": True}))
    with pytest.raises(ConfigError, match=r"adapter_config\.json: adapter config uses PEFT features dist_lora does "
                                          r"not support: use_future_lora=True"):
        LoraConfig.from_pretrained(tmp_path)
