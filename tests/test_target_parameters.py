"""LoRA on nn.Parameter targets (PEFT's ``target_parameters``) on transformers 5 MoE models,
against the real PEFT 0.21: saved files load both ways with the same logits, gradients match,
bad input is refused (the stacked-expert layout itself: tests/test_expert_layout.py).

Every parity test checks that each expert of each layer receives tokens of the batch (else an
expert mix-up could hide) and that the adapter changes the output.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import pytest
import torch

from dist_lora import ConfigError, LoraConfig, LoraModel, get_lora_model
from dist_lora.layers import LoraLayer
from dist_lora.layers.parameter import LoraParameter

try:
    from . import hf_models
except ImportError:
    import hf_models

FACTORIES = {"qwen3_moe": hf_models.tiny_qwen3_moe, "mixtral": hf_models.tiny_mixtral}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = "mlp.gate.weight"
ATOL = 1e-5
ids = hf_models.sample_ids(batch=2, seq=12)

# PEFT 0.21.2 warns that rank/alpha_pattern keys of parameters "did not match any targeted module"
# (it checks module names only, then applies them); the test asserts they were applied.
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _routed_experts(model) -> list[set[int]]:
    """The experts each MoE layer's router picks for ``ids`` (hooks on the router modules)."""
    hits, hooks = [], []
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            hooks.append(module.register_forward_hook(lambda m, i, out: hits.append(set(out[2].flatten().tolist()))))
    _logits(model)
    for hook in hooks:
        hook.remove()
    return hits


def _base(family: str):
    model = FACTORIES[family]()
    routed = _routed_experts(model)
    experts = model.config.num_experts if family == "qwen3_moe" else model.config.num_local_experts
    assert len(routed) == model.config.num_hidden_layers
    assert all(hit == set(range(experts)) for hit in routed), f"not every expert gets tokens: {routed}"
    return model


@torch.no_grad()
def _randomise(model, seed: int = 7) -> None:
    """Non-zero values for every LoRA factor (B too), so that every expert's adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def _lora_modules(model) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, LoraLayer) or type(m).__module__.startswith("peft")]


# --- parity with PEFT, both directions ------------------------------------------------------------


@pytest.mark.parametrize("family", list(FACTORIES))
def test_dist_lora_adapter_loads_in_peft_with_same_logits_and_gradients(tmp_path, family):
    """Attention LoRA (target_modules) and expert LoRA (target_parameters) together, with rsLoRA
    and rank/alpha patterns on the expert parameters."""
    base = _base(family)
    config = LoraConfig(
        r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS,
        rank_pattern={"down_proj": 3}, alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 6},
    )
    ours = get_lora_model(copy.deepcopy(base), config)
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert sorted(theirs.base_model.targeted_parameter_names) == sorted(ours.targeted_parameter_names)
    # PEFT warns that rank_pattern / alpha_pattern matched no targeted module, but applies them to parameters
    assert theirs.base_model.model.model.layers[0].mlp.experts.lora_A["default"].weight.shape[0] == 3 * 4
    expected = _logits(theirs)
    assert (expected - _logits(base)).abs().max() > 1e-2  # the adapter is not ignored
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=ATOL)

    for model in (ours, theirs):
        model(input_ids=ids).logits.square().mean().backward()
    peft_params = dict(theirs.named_parameters())
    grads = {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}
    assert any(".experts.base_layer.lora_A." in n for n in grads) and any(".experts.lora_B." in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, peft_params["base_model." + name].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", list(FACTORIES))
def test_peft_adapter_loads_with_same_logits(tmp_path, family):
    """A PEFT-saved target_parameters adapter (experts and the 2-D router weight, no target
    modules) into dist_lora."""
    base = _base(family)
    config = peft.LoraConfig(r=2, lora_alpha=8, target_modules=[], target_parameters=[*EXPERTS, ROUTER])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    _randomise(theirs, seed=11)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert set(ours.peft_config["default"].target_parameters) == {*EXPERTS, ROUTER}
    assert isinstance(ours.model.model.layers[0].mlp.gate, LoraParameter)
    expected = _logits(theirs)
    assert (expected - _logits(base)).abs().max() > 1e-2
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=ATOL)


def test_merge_and_unload_matches_peft_and_restores_the_module_tree(tmp_path):
    base = _base("qwen3_moe")
    config = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS)
    ours = get_lora_model(copy.deepcopy(base), config)
    _randomise(ours)
    ours.save_pretrained(tmp_path)
    before = _logits(ours)
    merged = ours.merge_and_unload()
    assert not _lora_modules(merged)
    assert type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(_logits(merged), before, rtol=0, atol=ATOL)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).merge_and_unload()
    for (name, ours_p), (_, peft_p) in zip(merged.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(ours_p, peft_p, rtol=0, atol=1e-6, msg=name)


def test_two_adapters_share_the_wrappers_and_switch_like_peft(tmp_path):
    base = _base("mixtral")
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    peft_model.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=5, target_modules=[], target_parameters=EXPERTS))
    _randomise(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path)  # default -> tmp_path, other -> tmp_path/other
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    assert sum(isinstance(m, LoraParameter) for m in ours.modules()) == 2 * base.config.num_hidden_layers
    for name in ("default", "other"):
        peft_model.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(_logits(ours), _logits(peft_model), rtol=0, atol=ATOL)
    peft_model.base_model.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    torch.testing.assert_close(_logits(ours), _logits(peft_model), rtol=0, atol=ATOL)  # both active: deltas add
    with pytest.raises(ConfigError, match="must all target the same parameters"):
        ours.add_adapter("third", LoraConfig(target_modules=[], target_parameters=EXPERTS[:1]))


# --- bad input ---------------------------------------------------------------------------------------


def test_adapter_for_another_expert_count_is_refused_and_model_untouched(tmp_path):
    peft.get_peft_model(
        hf_models.tiny_qwen3_moe(num_experts=8), peft.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS)
    ).save_pretrained(tmp_path)
    base = _base("qwen3_moe")
    state, expected = copy.deepcopy(base.state_dict()), _logits(base)
    message = r"adapter_model\.safetensors: base_model\.model\.model\.layers\.0\.mlp\.experts\..*stacked rank 16 holds " \
              r"8 experts of rank r=2, but Qwen3MoeExperts\.\w+ has 4 experts"
    with pytest.raises(ConfigError, match=message):
        LoraModel.from_pretrained(base, tmp_path)
    assert not _lora_modules(base) and all(p.requires_grad for p in base.parameters())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items()) and state.keys() == base.state_dict().keys()
    torch.testing.assert_close(_logits(base), expected, rtol=0, atol=0)

    ours = get_lora_model(base, LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    modules, saved = [type(m) for m in ours.modules()], copy.deepcopy(ours.state_dict())
    with pytest.raises(ConfigError, match="has 4 experts"):
        ours.load_adapter(tmp_path, "bad")
    assert list(ours.peft_config) == ["default"] and [type(m) for m in ours.modules()] == modules
    assert all(torch.equal(v, saved[k]) for k, v in ours.state_dict().items()) and saved.keys() == ours.state_dict().keys()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_parameters="mlp.experts.down_proj"), "target_parameters must be a list of parameter names"),
        (dict(target_parameters=["down_proj", 3]), "target_parameters must be a list of parameter names"),
        (dict(target_parameters=EXPERTS, lora_dropout=0.1), r"cannot be combined with lora_dropout=0\.1"),
        (dict(target_parameters=EXPERTS, use_dora=True), "cannot be combined with use_dora=True"),
        (dict(target_parameters=EXPERTS, lora_bias=True), "cannot be combined with lora_bias=True"),
        (dict(target_parameters=EXPERTS, fan_in_fan_out=True), "cannot be combined with fan_in_fan_out=True"),
        (dict(target_parameters=EXPERTS, init_lora_weights="pissa"), "cannot be combined with init_lora_weights='pissa'"),
        (dict(target_parameters=EXPERTS, layer_replication=[[0, 2]]), "cannot be combined with layer_replication"),
    ],
)
def test_bad_config_is_refused_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_peft_config_file_round_trips(tmp_path):
    peft.LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERTS).save_pretrained(tmp_path)
    config = LoraConfig.from_pretrained(tmp_path)
    assert set(config.target_parameters) == set(EXPERTS)
    config.save_pretrained(tmp_path / "ours")
    assert peft.LoraConfig.from_pretrained(tmp_path / "ours").target_parameters == config.target_parameters


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=[], target_parameters=["experts.up_proj"]), r"matched no parameter .* Parameters it has: "),
        (dict(target_modules=["q_proj"], target_parameters=["q_proj.weight"]), "cannot be targeted by both"),
        (dict(target_modules=[], target_parameters=[*EXPERTS, "q_norm.weight"]), r"'model\.layers\.0\.self_attn\.q_norm\.weight': only 2-D"),
    ],
)
def test_bad_targets_are_refused_and_model_untouched(kwargs, message):
    base = _base("qwen3_moe")
    with pytest.raises(ConfigError, match=message):
        get_lora_model(base, LoraConfig(**kwargs))
    assert not _lora_modules(base) and all(p.requires_grad for p in base.parameters())


def test_weighted_adapter_is_refused_as_in_peft():
    ours = get_lora_model(_base("qwen3_moe"), LoraConfig(target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(ValueError, match="add_weighted_adapter does not support target_parameters"):
        ours.add_weighted_adapter(["default"], [1.0], "sum")


def test_init_matches_peft_defaults():
    """A stacked [r·E, in] kaiming-uniform(a=√5) (bound 1/√in, as PEFT's nn.Linear A), B zero: the
    adapter starts as the identity."""
    base = _base("qwen3_moe")
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=[], target_parameters=EXPERTS))
    layer = ours.model.model.layers[0].mlp.experts.base_layer
    a = layer.lora_A["default"].weight
    assert a.shape == (16, 32) and a.abs().max() <= 1 / 32 ** 0.5 and a.std() > 0.5 / 32 ** 0.5 / 3 ** 0.5
    assert not layer.lora_B["default"].weight.any()
    torch.testing.assert_close(_logits(ours), _logits(base), rtol=0, atol=0)


def test_refused_where_unsupported_deepspeed_and_state_dict_injection():
    from dist_lora.deepspeed.engine import initialize
    from dist_lora.peft_api import inject_adapter_in_model

    config = LoraConfig(target_modules=[], target_parameters=EXPERTS)
    ours = get_lora_model(hf_models.tiny_qwen3_moe(), config)
    with pytest.raises(ValueError, match=r"LoRA on parameters \(target_parameters: .*not supported under DeepSpeed"):
        initialize(ours, {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0, "zero_optimization": {"stage": 0}})
    state = ours.state_dict()
    with pytest.raises(ConfigError, match="a state_dict cannot choose the targets of a config with target_parameters"):
        inject_adapter_in_model(config, hf_models.tiny_qwen3_moe(), state_dict=state)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_parameters=["down_proj"]),
        dict(target_parameters=["model.layers.1.mlp.experts.gate_up_proj", "experts.down_proj"]),
        dict(target_modules=["q_proj"], target_parameters=EXPERTS, layers_to_transform=[0]),
        dict(target_modules=["q_proj"], target_parameters=EXPERTS, exclude_modules=["model.layers.0.mlp.experts"]),
    ],
    ids=["suffix", "full-name", "layers_to_transform", "exclude_modules"],
)
def test_matches_the_parameters_peft_matches(kwargs):
    """PEFT's rule: a name equal to '<module>.<param>' or its end after a '.'; layers_to_transform
    and exclude_modules filter target_modules only."""
    kwargs = {"target_modules": [], **kwargs}
    theirs = peft.get_peft_model(hf_models.tiny_qwen3_moe(), peft.LoraConfig(**kwargs))
    ours = get_lora_model(hf_models.tiny_qwen3_moe(), LoraConfig(**kwargs))
    assert sorted(ours.targeted_parameter_names) == sorted(theirs.base_model.targeted_parameter_names)
    assert sorted(ours.targeted_module_names) == sorted(theirs.base_model.targeted_module_names)


def _megatron_refusal() -> str:
    from tests.models import build_tiny_gpt, tiny_gpt_config

    model = build_tiny_gpt(tiny_gpt_config(tp=1, sp=False))
    try:
        get_lora_model(model, LoraConfig(target_modules=["linear_qkv"], target_parameters=["linear_fc1.weight"]))
    except ConfigError as e:
        assert not _lora_modules(model)
        return str(e)
    return "not refused"


def test_megatron_parameters_are_refused():
    from tests.harness import run_distributed

    [message] = run_distributed(_megatron_refusal, 1, tp=1)
    assert "target_parameters matched 'decoder.layers.0.mlp.linear_fc1.weight' of a megatron" in message


class _TransposedExperts(torch.nn.Module):
    """Experts stored [E, in, out] with ``is_transposed`` (as GPT-OSS-style modules say)."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ti,eio->teo", x, self.weight)


def test_transposed_experts_follow_peft(tmp_path):
    """An ``is_transposed`` module: PEFT takes [E, in, out] (no swap); ΔW[e] = s·(B_e A_e)ᵀ."""
    make = lambda: torch.nn.Sequential(_TransposedExperts())  # noqa: E731
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=[], target_parameters=["0.weight"]))
    _randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(make(), tmp_path)
    layer = ours.model[0]
    assert (layer.in_features, layer.out_features, layer.num_experts) == (5, 7, 3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(x)
        assert (expected - make()(x)).abs().max() > 1e-2
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=ATOL)
