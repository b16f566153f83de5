"""Merging adapters into TP-sharded megatron models and plain models, in place on each rank.

merged logits == unmerged LoRA logits; unmerge restores the base weights; merge_and_unload
leaves no LoRA layer; a bf16 base stays bf16; safe_merge with a NaN on one rank's shard
aborts on every rank and leaves every rank's model bytes unchanged; plain HF Llama merge
equals the real PEFT's merge_and_unload."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from megatron.core import parallel_state

from dist_lora import LoraConfig, get_lora_model
from dist_lora.layers import LoraLayer
from dist_lora.merge import MergeError
from tests import hf_models
from tests.harness import run_distributed
from tests.models import build_tiny_gpt, random_batch, tiny_gpt_config

MODEL = dict(num_attention_heads=8, num_query_groups=4)


def _lora_gpt(sp: bool, dtype: torch.dtype = torch.float32):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    extra = dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    model = build_tiny_gpt(tiny_gpt_config(tp, sp, **MODEL, **extra))
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"linear_fc2": 2})
    return get_lora_model(model, config, seed=0).eval()


def _logits(model) -> torch.Tensor:
    tokens, _ = random_batch(0)
    with torch.no_grad():
        out = model(tokens, position_ids=None, attention_mask=None)
    return out.float()  # [b, s, vocab / tp]: this rank's vocab shard (all ranks together: all logits)


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: layer.base_weight.detach().clone() for n, layer in model.lora_layers()}


def _merge_roundtrip(sp: bool) -> dict:
    model = _lora_gpt(sp)
    base = _base_weights(model)
    lora_logits = _logits(model)
    with model.disable_adapter():
        base_logits = _logits(model)
    model.merge_adapter()
    merged_logits = _logits(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()  # twice: one warning, no double merge
    twice_logits = _logits(model)
    model.unmerge_adapter()
    restored = max((layer.base_weight - base[n]).abs().max().item() for n, layer in model.lora_layers())
    unmerged_logits = _logits(model)
    model.merge_and_unload()
    plain = model.model
    return {
        "lora_vs_base": (lora_logits - base_logits).abs().max().item(),
        "merged": (merged_logits - lora_logits).abs().max().item(),
        "twice": (twice_logits - lora_logits).abs().max().item(),
        "warnings": [str(w.message) for w in caught],
        "restored": restored,
        "unmerged": (unmerged_logits - lora_logits).abs().max().item(),
        "unloaded": (_logits(plain) - lora_logits).abs().max().item(),
        "lora_left": sum(isinstance(m, LoraLayer) or ".lora_" in n for n, m in plain.named_modules()),
    }


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (4, False), (4, True)])
def test_merge_unmerge_unload_at_tp(tp: int, sp: bool) -> None:
    for result in run_distributed(_merge_roundtrip, tp, tp=tp, args=(sp,)):
        assert result["lora_vs_base"] > 1e-3  # the adapter changes the function
        assert result["merged"] < 1e-5
        assert result["twice"] < 1e-5
        assert len(result["warnings"]) == 1 and "already merged" in result["warnings"][0]
        assert result["restored"] < 1e-6
        assert result["unmerged"] < 1e-5
        assert result["unloaded"] < 1e-5
        assert result["lora_left"] == 0


def _bf16_merge() -> dict:
    model = _lora_gpt(False, torch.bfloat16)
    layers = dict(model.lora_layers())
    name, layer = next(iter(layers.items()))
    expected = (layer.base_weight.float() + layer.get_delta_weight("default")).to(torch.bfloat16)
    before = {n: p.dtype for n, p in model.model.named_parameters() if ".lora_" not in n}
    model.merge_adapter()
    after = {n: p.dtype for n, p in model.model.named_parameters() if ".lora_" not in n}
    exact = torch.equal(layer.base_weight, expected)
    plain = model.merge_and_unload()
    return {
        "base_dtypes": {str(layer.base_weight.dtype) for _, layer in layers.items()},
        "same": before == after,
        "exact": exact,
        "after_unload": {n.replace(".base_layer", ""): d for n, d in before.items()}
        == {n: p.dtype for n, p in plain.named_parameters()},
    }


def test_bf16_base_stays_bf16_at_tp2() -> None:
    for result in run_distributed(_bf16_merge, 2, tp=2):
        assert result["base_dtypes"] == {"torch.bfloat16"}
        assert result["same"] and result["after_unload"]
        assert result["exact"]  # computed in fp32, cast back once


def _state_bytes(model) -> dict[str, bytes]:
    return {k: v.detach().clone().contiguous().view(torch.uint8).numpy().tobytes() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def _nan_on_one_rank(bad_rank: int, unload: bool) -> dict:
    model = _lora_gpt(False)
    if torch.distributed.get_rank() == bad_rank:
        # a column-parallel layer's B is sharded: only this rank's shard gets the NaN
        name, layer = next((n, l) for n, l in model.lora_layers() if n.endswith("linear_fc1"))
        with torch.no_grad():
            layer.lora_B["default"].weight[0, 0] = float("nan")
    before = _state_bytes(model)
    try:
        if unload:
            model.merge_and_unload(safe_merge=True)
        else:
            model.merge_adapter(safe_merge=True)
        error = None
    except MergeError as e:
        error = str(e)
    after = _state_bytes(model)
    return {
        "error": error,
        "unchanged": before == after,
        "merged": sum(bool(layer.merged_adapters) for _, layer in model.lora_layers()),
        "lora_layers": len(list(model.lora_layers())),
    }


@pytest.mark.parametrize("tp,pp,bad_rank,unload", [(2, 1, 1, False), (2, 1, 1, True), (2, 2, 2, False)])
def test_safe_merge_nan_on_one_rank_aborts_everywhere(tp: int, pp: int, bad_rank: int, unload: bool) -> None:
    results = run_distributed(_nan_on_one_rank, tp * pp, tp=tp, pp=pp, args=(bad_rank, unload))
    for result in results:
        assert result["error"] is not None
        assert "linear_fc1.weight" in result["error"] and f"rank {bad_rank}" in result["error"]
        assert result["unchanged"]
        assert result["merged"] == 0 and result["lora_layers"] > 0


def test_merge_without_safe_merge_on_plain_model_warns_once_and_unmerges() -> None:
    model = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             target_modules=["q_proj", "v_proj"]), seed=0)
    base = _base_weights(model)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged") as record:
        model.merge_adapter()
    assert len(record) == 1
    model.unmerge_adapter()
    assert max((layer.base_weight - base[n]).abs().max().item() for n, layer in model.lora_layers()) < 1e-6


def test_safe_merge_plain_model_nan_leaves_model_unchanged() -> None:
    model = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=4, init_lora_weights=False,
                                                             target_modules=["q_proj", "v_proj"]), seed=0)
    name, layer = list(model.lora_layers())[-1]
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("inf")
    before = _state_bytes(model)
    with pytest.raises(MergeError, match=name.replace(".", r"\.")):
        model.merge_and_unload(safe_merge=True)
    assert _state_bytes(model) == before
    assert not any(layer.merged for _, layer in model.lora_layers())


def test_plain_llama_merge_matches_peft() -> None:
    import peft

    base = hf_models.tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs), seed=0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    peft.set_peft_model_state_dict(theirs, ours.adapter_state_dict())  # same adapter in both
    ids = torch.randint(hf_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora_logits = ours(ids).logits
        assert (theirs(ids).logits - lora_logits).abs().max() < 1e-5
    merged_ours = ours.merge_and_unload(progressbar=False, safe_merge=True)
    merged_theirs = theirs.merge_and_unload(safe_merge=True)
    ours_sd, theirs_sd = merged_ours.state_dict(), merged_theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], atol=1e-6, rtol=0)
    with torch.no_grad():
        assert (merged_ours(ids).logits - lora_logits).abs().max() < 1e-5


def test_replicated_layers_cannot_be_merged() -> None:
    model = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), seed=0)
    config = copy.copy(model.peft_config["default"])
    object.__setattr__(config, "layer_replication", [[0, 2], [1, 2]])
    model.peft_config["default"] = config
    with pytest.raises(MergeError, match="layer_replication"):
        model.merge_and_unload()
    assert not any(layer.merged for _, layer in model.lora_layers())


def test_shared_base_weights_cannot_be_merged() -> None:
    """Replicated layers share their base weights (layer_replication): merging is refused,
    found on the tensors themselves."""
    base = hf_models.tiny_llama()
    layers = base.model.layers
    layers[1].self_attn.q_proj.weight = layers[0].self_attn.q_proj.weight  # as replication shares them
    model = get_lora_model(base, LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]), seed=0)
    before = _state_bytes(model)
    with pytest.raises(MergeError, match=r"layers\.1\.self_attn\.q_proj and .*layers\.0\.self_attn\.q_proj share"):
        model.merge_and_unload()
    assert _state_bytes(model) == before
    assert not any(layer.merged for _, layer in model.lora_layers())


def test_lora_bias_without_base_bias_is_refused_before_any_merge() -> None:
    model = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=2, init_lora_weights=False, lora_bias=True,
                                                             target_modules=["q_proj", "v_proj"]), seed=0)
    before = _state_bytes(model)
    with pytest.raises(MergeError, match="no bias"):
        model.merge_adapter()
    assert _state_bytes(model) == before


# --- DoRA: safe_merge checks the value a DoRA merge writes (its row rescale included) ------------
#
# W' = m / ||W + ΔW||_row · (W + ΔW): with a huge (finite) magnitude m the rescale overflows to
# Inf although W + ΔW is finite, so a check of W + ΔW alone would let the merge write Inf.
HUGE = 3e38  # finite in fp32; m / ||W + ΔW|| overflows for a row norm below ~1.1


def _huge_magnitude(layer: LoraLayer, row: int = 0) -> None:
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[row] = HUGE


def test_safe_merge_refuses_dora_rescale_overflow_on_plain_model() -> None:
    model = get_lora_model(hf_models.tiny_llama(), LoraConfig(r=4, init_lora_weights=False, use_dora=True,
                                                             target_modules=["q_proj", "v_proj"]), seed=0)
    name, layer = list(model.lora_layers())[-1]
    _huge_magnitude(layer)
    assert torch.isfinite(layer.base_weight.float() + layer.get_delta_weight("default")).all()
    before = _state_bytes(model)
    with pytest.raises(MergeError, match=name.replace(".", r"\.") + r"\.weight"):
        model.merge_and_unload(safe_merge=True)
    assert _state_bytes(model) == before
    assert not any(layer.merged for _, layer in model.lora_layers())
    with pytest.raises(ValueError, match="NaN or Inf"):  # the layer's own safe_merge checks the same value
        layer.merge(safe_merge=True)
    assert _state_bytes(model) == before and not layer.merged


def _dora_overflow_on_one_rank(bad_rank: int, module: str) -> dict:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = build_tiny_gpt(tiny_gpt_config(tp, False, **MODEL))
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    model = get_lora_model(model, config, seed=0).eval()
    if torch.distributed.get_rank() == bad_rank:
        # linear_fc1 (column-parallel): m is sharded with the rows, so only this rank's shard overflows;
        # linear_fc2 (row-parallel): m is replicated, the norm summed over TP; only this rank's copy is huge
        layer = next(layer for n, layer in model.lora_layers() if n.endswith(module))
        _huge_magnitude(layer)
    before = _state_bytes(model)
    try:
        model.merge_adapter(safe_merge=True)
        error = None
    except MergeError as e:
        error = str(e)
    return {
        "error": error,
        "unchanged": before == _state_bytes(model),
        "merged": sum(bool(layer.merged_adapters) for _, layer in model.lora_layers()),
    }


@pytest.mark.parametrize("tp,bad_rank,module", [(1, 0, "linear_fc1"), (2, 1, "linear_fc1"), (2, 0, "linear_fc2")])
def test_safe_merge_refuses_dora_rescale_overflow_on_every_rank(tp: int, bad_rank: int, module: str) -> None:
    for result in run_distributed(_dora_overflow_on_one_rank, tp, tp=tp, args=(bad_rank, module)):
        assert result["error"] is not None
        assert f"{module}.weight" in result["error"]
        assert tp == 1 or f"rank {bad_rank}" in result["error"]  # a single process names no rank
        assert result["unchanged"] and result["merged"] == 0
