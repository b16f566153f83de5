"""find_targets: which modules get a LoRA layer, cross-checked against real PEFT.

For Hugging Face models every case is run twice: dist_lora's ``find_targets`` and PEFT's
``get_peft_model`` on a copy of the same model with the same settings; the sets of module
names that received a LoRA layer must be equal.

Known, deliberate differences from PEFT 0.21.2 (not cross-checked here):
- a ``target_modules`` list entry equal to a full module name bypasses ``layers_to_transform``
  in PEFT (``key in target_modules`` short-circuits the layer filter); dist_lora applies it;
- dist_lora supports linear layers (nn.Linear, Conv1D, megatron Column/RowParallelLinear) and
  embeddings (nn.Embedding, megatron VocabParallelEmbedding; see tests/test_embedding_lora.py):
  an explicitly targeted Conv2d is an error here, PEFT would adapt it;
- ``all-linear`` also excludes modules named ``lm_head``/``output_layer`` on models that are
  not ``PreTrainedModel`` (PEFT only drops the output embedding of a PreTrainedModel), and
  includes megatron's parallel linears (which PEFT's all-linear never sees);
- default targets exist only for llama/mistral/qwen2/gpt2 and megatron GPTModel.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from dist_lora.config import ConfigError, LoraConfig  # noqa: E402
from dist_lora.targeting import find_targets  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402


# --------------------------------------------------------------------------------------------
# tiny Hugging Face models
# --------------------------------------------------------------------------------------------


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.Qwen2ForCausalLM(cfg)


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"llama": _llama(), "qwen2": _qwen2(), "gpt2": _gpt2()}


def peft_targets(model: nn.Module, **kwargs) -> set[str]:
    """Names (relative to the HF model) of the modules real PEFT puts a LoRA layer on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    return {name for name, module in pm.base_model.model.named_modules() if isinstance(module, PeftLoraLayer)}


def ours(model: nn.Module, **kwargs) -> list[str]:
    found = find_targets(model, LoraConfig(**kwargs))
    assert len(found) == len(set(found)), "duplicate target names"
    order = [n for n, _ in model.named_modules()]
    assert found == sorted(found, key=order.index), "targets not in module order"
    return found


def L(*suffixes, layers=(0, 1), prefix="model.layers"):
    return {f"{prefix}.{i}.{s}" for i in layers for s in suffixes}


ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GPT2_ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# (model, LoraConfig kwargs, expected names) -- expected is written out by hand and PEFT must agree.
CASES = [
    # lists: exact name or "." + entry suffix
    ("llama", dict(target_modules=["q_proj", "v_proj"]), L("self_attn.q_proj", "self_attn.v_proj")),
    ("llama", dict(target_modules=["self_attn.o_proj", "mlp.down_proj"]), L("self_attn.o_proj", "mlp.down_proj")),
    ("llama", dict(target_modules=["model.layers.1.mlp.up_proj"]), {"model.layers.1.mlp.up_proj"}),
    ("llama", dict(target_modules=["layers.1.mlp.up_proj", "0.self_attn.k_proj"]),
     {"model.layers.1.mlp.up_proj", "model.layers.0.self_attn.k_proj"}),
    ("llama", dict(target_modules=["lm_head"]), {"lm_head"}),  # explicit: the head may be targeted
    # regex strings: fullmatch
    ("llama", dict(target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"),
     {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}),
    ("llama", dict(target_modules=r".*\.(q|v)_proj"), L("self_attn.q_proj", "self_attn.v_proj")),
    ("llama", dict(target_modules=r".*mlp\.\w+_proj"), L(*MLP)),
    # all-linear: every Linear but the output head
    ("llama", dict(target_modules="all-linear"), L(*ATTN, *MLP)),
    ("llama", dict(target_modules="ALL-Linear"), L(*ATTN, *MLP)),  # PEFT compares case-insensitively
    # None: PEFT's per-architecture defaults
    ("llama", dict(), L("self_attn.q_proj", "self_attn.v_proj")),
    ("llama", dict(layers_to_transform=1), L("self_attn.q_proj", "self_attn.v_proj", layers=[1])),
    # exclude_modules: list and regex, applied before target matching
    ("llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
     L("self_attn.v_proj") | {"model.layers.1.self_attn.q_proj"}),
    ("llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "self_attn.k_proj"]),
     L("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*\.0\..*"), L(*ATTN, *MLP, layers=[1])),
    ("llama", dict(target_modules=r".*_proj", exclude_modules=r".*(gate|up)_proj"), L(*ATTN, "mlp.down_proj")),
    # layers_to_transform, with and without layers_pattern
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1),
     L("self_attn.q_proj", "mlp.down_proj", layers=[1])),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0]),
     L("self_attn.q_proj", "mlp.down_proj", layers=[0])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[0, 1]), L("self_attn.q_proj")),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
     L("self_attn.q_proj", "self_attn.v_proj", layers=[1])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern=["h", "layers"]),
     L("self_attn.q_proj", layers=[0])),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[]), L("self_attn.q_proj")),  # [] = no filter
    # modules_to_save are never targeted (also everything below them)
    ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["q_proj"]), L("self_attn.v_proj")),
    ("llama", dict(target_modules="all-linear", modules_to_save=["self_attn"]), L(*MLP)),
    ("llama", dict(target_modules=["q_proj", "o_proj"], modules_to_save=["model.layers.1.self_attn"]),
     L("self_attn.q_proj", "self_attn.o_proj", layers=[0])),
    # qwen2
    ("qwen2", dict(), L("self_attn.q_proj", "self_attn.v_proj")),
    ("qwen2", dict(target_modules="all-linear"), L(*ATTN, *MLP)),
    ("qwen2", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=0),
     L("self_attn.q_proj", "mlp.up_proj", layers=[0])),
    # gpt2 (Conv1D layers; lm_head is a Linear tied to wte)
    ("gpt2", dict(), L("attn.c_attn", prefix="transformer.h")),
    ("gpt2", dict(target_modules="all-linear"), L(*GPT2_ALL, prefix="transformer.h")),
    ("gpt2", dict(target_modules=["c_proj"]), L("attn.c_proj", "mlp.c_proj", prefix="transformer.h")),
    ("gpt2", dict(target_modules=["mlp.c_proj"]), L("mlp.c_proj", prefix="transformer.h")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h"),
     L("attn.c_attn", "mlp.c_fc", layers=[1], prefix="transformer.h")),
    ("gpt2", dict(target_modules="all-linear", exclude_modules=r"transformer\.h\.1\..*"),
     L(*GPT2_ALL, layers=[0], prefix="transformer.h")),
]


@pytest.mark.parametrize("arch, kwargs, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_find_targets_matches_peft(models, arch, kwargs, expected):
    model = models[arch]
    found = set(ours(model, **kwargs))
    assert found == expected
    assert peft_targets(model, **kwargs) == found


def test_regex_is_fullmatch_not_search(models):
    # "q_proj" as a regex string fullmatches no module name: both refuse.
    with pytest.raises(ConfigError, match=r"matched no module"):
        find_targets(models["llama"], LoraConfig(target_modules="q_proj"))
    with pytest.raises(ValueError):
        peft_targets(models["llama"], target_modules="q_proj")


def test_list_entry_is_not_a_substring(models):
    # "proj" is neither a full name nor a "."-separated suffix of "...q_proj".
    with pytest.raises(ConfigError, match=r"matched no module"):
        find_targets(models["llama"], LoraConfig(target_modules=["proj", "_proj"]))
    with pytest.raises(ValueError):
        peft_targets(models["llama"], target_modules=["proj", "_proj"])


def test_find_targets_does_not_modify_the_model_or_config(models):
    model = models["llama"]
    cfg = LoraConfig(target_modules="all-linear")
    before_cfg = cfg.to_dict()
    before_modules = [(n, type(m)) for n, m in model.named_modules()]
    find_targets(model, cfg)
    assert cfg.to_dict() == before_cfg
    assert [(n, type(m)) for n, m in model.named_modules()] == before_modules


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_no_match_lists_candidates(models):
    with pytest.raises(ConfigError, match=r"target_modules=\['nonexistent_proj'\] matched no module of "
                                          r"LlamaForCausalLM\. Linear modules it has: ") as info:
        find_targets(models["llama"], LoraConfig(target_modules=["nonexistent_proj"]))
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "q_proj" in message and "down_proj" in message
    assert "embed_tokens" not in message  # only supported (linear) modules are offered


def test_no_match_because_of_layers_to_transform(models):
    with pytest.raises(ConfigError, match=r"matched no module of LlamaForCausalLM \(with layers_to_transform=\[5\]\)"):
        find_targets(models["llama"], LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))
    with pytest.raises(ValueError):
        peft_targets(models["llama"], target_modules=["q_proj"], layers_to_transform=[5])


def test_no_match_because_everything_excluded(models):
    with pytest.raises(ConfigError, match=r"matched no module"):
        find_targets(models["gpt2"], LoraConfig(target_modules=["c_attn"], exclude_modules=["c_attn"]))


def test_no_match_candidates_list_is_truncated(models):
    with pytest.raises(ConfigError, match=r"Linear modules it has: .*, \.\.\.\.$"):
        find_targets(models["llama"], LoraConfig(target_modules=["nope"]))


@pytest.mark.parametrize(
    "arch, targets, name, kind",
    [("llama", r".*layernorm", "model.layers.0.input_layernorm", "LlamaRMSNorm"),
     ("gpt2", ["attn"], "transformer.h.0.attn", "GPT2Attention")],
)
def test_unsupported_module_type(models, arch, targets, name, kind):
    with pytest.raises(ConfigError, match=rf"target module '{re.escape(name)}' is a {kind}; LoRA here supports "
                                          r"nn\.Linear, transformers Conv1D and megatron Column/RowParallelLinear"):
        find_targets(models[arch], LoraConfig(target_modules=targets))


def test_conv_layers_stay_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"target module '0' is a Conv2d; LoRA here supports "
                                          r"nn\.Linear, transformers Conv1D and megatron Column/RowParallelLinear"):
        find_targets(model, LoraConfig(target_modules=["0", "2"]))


def test_unsupported_module_outside_layers_to_transform_is_skipped(models):
    # `norm` matches the final model.norm (an RMSNorm, unsupported); it has no layer index, so
    # with layers_to_transform it is filtered out before the type check, as in PEFT.
    model = models["llama"]
    with pytest.raises(ConfigError, match=r"target module 'model.norm' is a LlamaRMSNorm"):
        find_targets(model, LoraConfig(target_modules=["q_proj", "norm"]))
    kwargs = dict(target_modules=["q_proj", "norm"], layers_to_transform=[0])
    assert set(ours(model, **kwargs)) == {"model.layers.0.self_attn.q_proj"}
    assert peft_targets(model, **kwargs) == {"model.layers.0.self_attn.q_proj"}


class _Unknown(nn.Module):
    def __init__(self, model_type=None):
        super().__init__()
        if model_type is not None:
            self.config = transformers.PretrainedConfig()
            self.config.model_type = model_type
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc_in": nn.Linear(4, 4), "act": nn.ReLU(), "fc_out": nn.Linear(4, 4)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(4, 8)


@pytest.mark.parametrize("model_type", [None, "my_arch"])
def test_unknown_architecture_needs_target_modules(model_type):
    model = _Unknown(model_type)
    with pytest.raises(ConfigError, match=r"target_modules is None and there are no default targets for _Unknown"
                                          r".*Set target_modules explicitly"):
        find_targets(model, LoraConfig())
    with pytest.raises(ValueError):
        peft_targets(model)
    # explicit targets work
    assert find_targets(model, LoraConfig(target_modules=["fc_in"])) == ["blocks.0.fc_in", "blocks.1.fc_in"]
    assert peft_targets(model, target_modules=["fc_in"]) == {"blocks.0.fc_in", "blocks.1.fc_in"}


def test_all_linear_on_plain_module_skips_lm_head():
    # Deliberate difference: PEFT only drops the output embedding of a PreTrainedModel, so on a
    # plain nn.Module it would adapt `lm_head`; dist_lora never adapts lm_head/output_layer here.
    model = _Unknown()
    found = set(find_targets(model, LoraConfig(target_modules="all-linear")))
    assert found == {"blocks.0.fc_in", "blocks.0.fc_out", "blocks.1.fc_in", "blocks.1.fc_out"}
    assert peft_targets(model, target_modules="all-linear") == found | {"lm_head"}


def test_layers_to_transform_default_pattern_uses_first_index():
    # Without layers_pattern the FIRST "<name>.<index>." counts, not the expert index of an MoE.
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(
                nn.ModuleDict({"experts": nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(4, 4)}) for _ in range(3))})
                for _ in range(2)
            )

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    model = MoE()
    for pattern in (None, "layers"):
        kwargs = dict(target_modules=["w1"], layers_to_transform=[0], layers_pattern=pattern)
        found = set(ours(model, **kwargs))
        assert found == {f"model.layers.0.experts.{e}.w1" for e in range(3)}
        assert peft_targets(model, **kwargs) == found
    kwargs = dict(target_modules=["w1"], layers_to_transform=[0], layers_pattern="experts")
    found = set(ours(model, **kwargs))
    assert found == {f"model.layers.{i}.experts.0.w1" for i in range(2)}
    assert peft_targets(model, **kwargs) == found


# --------------------------------------------------------------------------------------------
# megatron GPTModel
# --------------------------------------------------------------------------------------------


def _tiny_gpt():
    """A tiny megatron GPTModel, built inside a harness rank: the test process itself must
    never initialise megatron's parallel state (a later forked rank would hang in it)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               use_cpu_initialization=True, gradient_accumulation_fusion=False)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                    max_sequence_length=16, position_embedding_type="learned_absolute")


def _with_gpt(check) -> None:
    """Run ``check(model)`` on a tiny GPTModel in a one-rank harness process."""
    from tests.harness import run_distributed

    run_distributed(lambda: check(_tiny_gpt()), 1)


GPT_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def test_megatron_default_targets():
    _with_gpt(_check_default_targets)


def _check_default_targets(gpt_model):
    found = ours(gpt_model)
    assert set(found) == L(*GPT_LINEARS, prefix="decoder.layers")
    assert len(found) == 8


def test_megatron_all_linear_excludes_output_layer():
    _with_gpt(_check_all_linear)


def _check_all_linear(gpt_model):
    names = {n for n, _ in gpt_model.named_modules()}
    assert "output_layer" in names  # the head exists (and is a ColumnParallelLinear) ...
    found = ours(gpt_model, target_modules="all-linear")
    assert set(found) == L(*GPT_LINEARS, prefix="decoder.layers")  # ... but is not targeted
    assert "output_layer" not in found


def test_megatron_explicit_targets():
    _with_gpt(_check_explicit_targets)


def _check_explicit_targets(gpt_model):
    assert set(ours(gpt_model, target_modules=["linear_qkv"], layers_to_transform=[1], layers_pattern="layers")) == {
        "decoder.layers.1.self_attention.linear_qkv"
    }
    assert ours(gpt_model, target_modules=["output_layer"]) == ["output_layer"]
    assert set(ours(gpt_model, target_modules=r".*\.mlp\.linear_fc\d")) == L("mlp.linear_fc1", "mlp.linear_fc2",
                                                                             prefix="decoder.layers")
    assert set(ours(gpt_model, exclude_modules=["linear_proj", "linear_fc2"])) == L(
        "self_attention.linear_qkv", "mlp.linear_fc1", prefix="decoder.layers")


def test_megatron_embedding_is_targeted_by_name():
    _with_gpt(_check_embedding_targeted)


def _check_embedding_targeted(gpt_model):
    assert ours(gpt_model, target_modules=["word_embeddings"]) == ["embedding.word_embeddings"]
    assert "embedding.word_embeddings" not in ours(gpt_model, target_modules="all-linear")


def test_megatron_no_match_lists_candidates():
    _with_gpt(_check_no_match)


def _check_no_match(gpt_model):
    with pytest.raises(ConfigError, match=r"matched no module of GPTModel\. Linear modules it has: "
                                          r".*decoder\.layers\.0\.self_attention\.linear_qkv"):
        find_targets(gpt_model, LoraConfig(target_modules=["q_proj"]))


def test_no_match_names_the_layers_pattern(models):
    with pytest.raises(ConfigError, match=r"matched no module of LlamaForCausalLM \(with layers_to_transform=\[0\], "
                                          r"layers_pattern='h'\)"):
        find_targets(models["llama"], LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="h"))


# --- the name-level rule (is_targeted) against PEFT's check_target_module_exists ----------------

NAMES = [
    "lm_head",
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.12.mlp.down_proj",
    "model.layers.0.mlp",
    "model.layers.0.mlp.up_proj",
    "model.my_lm_head",
    "transformer.h.1.attn.c_attn",
]
NAME_CASES = [
    dict(target_modules=["q_proj", "down_proj"]),
    dict(target_modules=r".*\.(q|v)_proj"),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.1.self_attn.q_proj"]),
    dict(target_modules=["q_proj", "down_proj"], exclude_modules=r".*\.1\..*"),
    dict(target_modules=["q_proj", "down_proj", "c_attn"], layers_to_transform=[1, 12]),
    dict(target_modules=["q_proj", "lm_head", "embed_tokens"], layers_to_transform=0),
    dict(target_modules=["q_proj", "model.layers.1.self_attn.v_proj"], layers_to_transform=[0]),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[1], layers_pattern=["h", "layers"]),
    dict(target_modules=["q_proj", "up_proj", "lm_head"], modules_to_save=["mlp", "lm_head"]),
    dict(target_modules=["q_proj", "up_proj"], modules_to_save=["layers.0.mlp"]),
]


@pytest.mark.parametrize("kwargs", NAME_CASES, ids=[str(i) for i in range(len(NAME_CASES))])
def test_name_level_rule_matches_peft(kwargs):
    from peft.tuners.tuners_utils import check_target_module_exists

    from dist_lora.targeting import is_targeted

    ours_config, theirs_config = LoraConfig(**kwargs), peft.LoraConfig(**kwargs)
    for name in NAMES:
        theirs = bool(check_target_module_exists(theirs_config, name))
        ours_peft = is_targeted(ours_config, name, ours_config.target_modules, full_name_skips_layers=True)
        assert ours_peft == theirs, name
        if not (isinstance(kwargs["target_modules"], list) and name in kwargs["target_modules"]):
            # injection differs from PEFT only where a full name bypasses layers_to_transform
            assert is_targeted(ours_config, name, ours_config.target_modules) == theirs, name
