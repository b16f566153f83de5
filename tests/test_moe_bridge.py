"""Mixture-of-experts models through the HF -> megatron bridge: a GPTModel built from a saved
tiny random Mixtral or Qwen3-MoE computes the transformers model's logits (fp32, atol 1e-4)
at (EP, TP) = (1,1), (2,1), (1,2), (2,2) (SP on where TP > 1; expert-TP 1 with the all-to-all
dispatcher and expert-TP = TP with the all-gather one), from both on-disk layouts (per-expert
tensors, as transformers 5.24 writes them, and transformers 5's fused 3-D expert tensors);
Qwen3-MoE with norm_topk_prob true and false and with a dense layer (mlp_only_layers). Every
expert receives tokens in the test batch. Bad MoE configs and layouts fail before any process
group work, naming the field."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dist_lora.bridges import (  # noqa: E402
    MIXTRAL,
    UnsupportedCheckpointError,
    build_megatron_gpt,
    transformer_config_from_hf,
)
from dist_lora.naming import global_expert_index  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import tiny_mixtral, tiny_qwen3_moe  # noqa: E402
from tests.tp_utils import gather_tp  # noqa: E402

VOCAB, BATCH, SEQ, EXPERTS = 128, 2, 16, 4
# Geometry of the bridge tests (GQA dividing over TP=2), 4 experts, weights large enough that
# a layout mistake cannot hide under atol.
MIXTRAL_KW = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=64,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=EXPERTS,
    num_experts_per_tok=2,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
)
QWEN3_MOE_KW = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,  # the dense MLP of mlp_only_layers
    moe_intermediate_size=32,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,  # not hidden / heads = 8
    num_experts=EXPERTS,
    num_experts_per_tok=2,
    initializer_range=0.1,
)
# name -> (builder, config, (per-expert module prefix, (gate, up, down) names, old router name))
MODELS = {
    "mixtral": (tiny_mixtral, MIXTRAL_KW, ("block_sparse_moe.experts", ("w1", "w3", "w2"), "block_sparse_moe.gate")),
    "qwen3_moe": (tiny_qwen3_moe, QWEN3_MOE_KW, ("mlp.experts", ("gate_proj", "up_proj", "down_proj"), "mlp.gate")),
    "qwen3_moe_unnormalised": (
        tiny_qwen3_moe, {**QWEN3_MOE_KW, "norm_topk_prob": False},
        ("mlp.experts", ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
    ),
    "qwen3_moe_dense_layer0": (
        tiny_qwen3_moe, {**QWEN3_MOE_KW, "mlp_only_layers": [0]},
        ("mlp.experts", ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
    ),
}


def _ids() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _randomise_norms(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF inits norms to 1: randomise so that swaps show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))


def write_v5_layout(src: str, dst: str, per_expert: str, parts: tuple[str, str, str], router: str) -> None:
    """Rewrite a per-expert checkpoint in transformers 5's fused layout: per layer
    ``mlp.experts.gate_up_proj`` [E, 2I, H] (= [gate_e; up_e]), ``mlp.experts.down_proj``
    [E, H, I] and the router as ``mlp.gate``. ``per_expert``: the experts' module prefix
    (``block_sparse_moe.experts``), ``parts``: (gate, up, down) names, ``router``: its old name."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    out = {k.replace(f".{router}.", ".mlp.gate."): v for k, v in state.items() if f".{per_expert}." not in k}
    layers = sorted({int(k.split(".")[2]) for k in state if f".{per_expert}." in k})
    for n in layers:
        stack = {p: torch.stack([state[f"model.layers.{n}.{per_expert}.{e}.{p}.weight"] for e in range(EXPERTS)])
                 for p in parts}
        out[f"model.layers.{n}.mlp.experts.gate_up_proj"] = torch.cat([stack[parts[0]], stack[parts[1]]], 1).contiguous()
        out[f"model.layers.{n}.mlp.experts.down_proj"] = stack[parts[2]].contiguous()
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def _save(kind: str, root) -> dict:
    builder, kwargs, (per_expert, parts, router) = MODELS[kind]
    model = builder(seed=3, **kwargs)
    _randomise_norms(model, 4)
    model.save_pretrained(root / "per_expert")
    write_v5_layout(str(root / "per_expert"), str(root / "v5"), per_expert, parts, router)
    with torch.no_grad():
        out = model(input_ids=_ids(), output_router_logits=True)
    counts = [torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=EXPERTS)
              for logits in out.router_logits]
    return {"per_expert": str(root / "per_expert"), "v5": str(root / "v5"), "logits": out.logits, "counts": counts}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """kind -> {"per_expert": dir, "v5": dir, "logits": HF logits, "counts": tokens per expert
    in each MoE layer}."""
    return {kind: _save(kind, tmp_path_factory.mktemp(kind)) for kind in MODELS}


@pytest.fixture(scope="module")
def mixtral(checkpoints: dict) -> dict:
    return checkpoints["mixtral"]


def test_transformers_writes_per_expert_and_reads_both_layouts(mixtral: dict, checkpoints: dict) -> None:
    """transformers 5.24's save_pretrained writes the experts per expert (it reverts its
    load-time fusion), and from_pretrained reads the fused 3-D layout to the same model."""
    keys = set(load_file(os.path.join(mixtral["per_expert"], "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    qwen = checkpoints["qwen3_moe"]
    keys = set(load_file(os.path.join(qwen["per_expert"], "model.safetensors")))
    assert {"model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.gate.weight"} <= keys
    for ckpt in (mixtral, qwen):
        v5 = AutoModelForCausalLM.from_pretrained(ckpt["v5"], dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(v5(input_ids=_ids()).logits, ckpt["logits"], atol=0, rtol=0)


def _megatron_logits(hf_dir: str, tp: int, ep: int, etp: int) -> torch.Tensor:
    model = build_megatron_gpt(hf_dir, tp=tp, sequence_parallel=tp > 1, ep=ep, etp=etp).eval()
    assert len(model.decoder.layers[-1].mlp.experts.local_experts) == EXPERTS // ep
    with torch.no_grad():
        out = model(_ids(), None, None)
    return gather_tp(out, dim=-1)


@pytest.mark.parametrize(
    "kind,layout,ep,tp,etp",
    [
        ("mixtral", "per_expert", 1, 1, 1),
        ("mixtral", "per_expert", 2, 1, 1),
        ("mixtral", "per_expert", 1, 2, 1),
        ("mixtral", "per_expert", 2, 2, 1),
        ("mixtral", "v5", 1, 1, 1),
        ("mixtral", "v5", 2, 1, 1),
        ("mixtral", "v5", 1, 2, 2),
        ("mixtral", "v5", 2, 2, 2),
        ("qwen3_moe", "per_expert", 1, 1, 1),
        ("qwen3_moe", "per_expert", 2, 1, 1),
        ("qwen3_moe", "per_expert", 2, 2, 1),
        ("qwen3_moe", "per_expert", 1, 2, 2),
        ("qwen3_moe", "v5", 1, 2, 1),
        ("qwen3_moe", "v5", 2, 2, 2),
        ("qwen3_moe_unnormalised", "per_expert", 1, 1, 1),
        ("qwen3_moe_unnormalised", "v5", 2, 2, 1),
        ("qwen3_moe_dense_layer0", "per_expert", 2, 1, 1),
        ("qwen3_moe_dense_layer0", "v5", 2, 2, 2),
    ],
)
def test_moe_logits_match_hf(checkpoints: dict, kind: str, layout: str, ep: int, tp: int, etp: int) -> None:
    ckpt = checkpoints[kind]
    for layer, counts in enumerate(ckpt["counts"]):  # the check means something only if
        assert (counts > 0).all(), f"MoE layer {layer}: an expert gets no token ({counts.tolist()})"  # all work
    world = tp * max(1, ep * etp // tp)
    results = run_distributed(_megatron_logits, world, tp=tp, ep=ep, etp=etp, args=(ckpt[layout], tp, ep, etp))
    want = ckpt["logits"]
    assert want.abs().max() > 1.0, "reference logits too small to test the mapping"
    for logits in results:
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def _megatron_logits_pp2(hf_dir: str, ep: int):
    """Two pipeline stages run by hand (stage 0's hidden states -> stage 1); logits on stage 1."""
    from megatron.core import parallel_state

    model = build_megatron_gpt(hf_dir, pp=2, ep=ep, etp=1).eval()
    with torch.no_grad():
        if not parallel_state.is_pipeline_first_stage():
            hidden = torch.empty(SEQ, BATCH, model.config.hidden_size)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(_ids(), None, None)
        if not parallel_state.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe_dense_layer0"])
def test_moe_logits_match_hf_at_pp2_ep2(checkpoints: dict, kind: str) -> None:
    results = run_distributed(_megatron_logits_pp2, 4, pp=2, ep=2, etp=1, args=(checkpoints[kind]["per_expert"], 2))
    got = [r for r in results if r is not None]
    assert len(got) == 2
    for logits in got:
        torch.testing.assert_close(logits, checkpoints[kind]["logits"], atol=1e-4, rtol=0)


def test_qwen3_moe_router_settings_and_dense_layers(checkpoints: dict) -> None:
    configs = {kind: json.load(open(os.path.join(checkpoints[kind]["per_expert"], "config.json")))
               for kind in ("qwen3_moe", "qwen3_moe_unnormalised", "qwen3_moe_dense_layer0")}
    normalised = transformer_config_from_hf(configs["qwen3_moe"])
    assert not normalised.moe_router_pre_softmax and normalised.qk_layernorm and normalised.moe_ffn_hidden_size == 32
    assert normalised.moe_layer_freq == 1 and normalised.num_moe_experts == EXPERTS
    assert transformer_config_from_hf(configs["qwen3_moe_unnormalised"]).moe_router_pre_softmax
    dense0 = transformer_config_from_hf(configs["qwen3_moe_dense_layer0"])
    assert dense0.moe_layer_freq == [0, 1] and dense0.ffn_hidden_size == 96
    step2 = transformer_config_from_hf(configs["qwen3_moe"] | {"num_hidden_layers": 4, "decoder_sparse_step": 2})
    assert step2.moe_layer_freq == [0, 1, 0, 1]
    with pytest.raises(UnsupportedCheckpointError, match=r"mlp_only_layers=\[0, 1\].* leave no MoE layer"):
        transformer_config_from_hf(configs["qwen3_moe"] | {"mlp_only_layers": [0, 1]})
    with pytest.raises(UnsupportedCheckpointError, match=r"mlp_only_layers=\[5\]: .*dense layers in 0..1"):
        transformer_config_from_hf(configs["qwen3_moe"] | {"mlp_only_layers": [5]})


# ---------------------------------------------------------------------------------------------
# The table's expert entries and the bad-input rules (no process groups involved)


def test_expert_names_use_global_indices() -> None:
    table = MIXTRAL.modules
    mapped = table.megatron("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1")
    assert mapped.hf == ("model.layers.1.block_sparse_moe.experts.3.w1", "model.layers.1.block_sparse_moe.experts.3.w3")
    assert (mapped.expert, mapped.v5) == (3, "model.layers.1.mlp.experts.gate_up_proj")
    back, position = table.hf("base_model.model.model.layers.1.block_sparse_moe.experts.2.w3")
    assert (back.megatron, position) == ("decoder.layers.1.mlp.experts.local_experts.2.linear_fc1", 1)
    assert table.hf("model.layers.0.block_sparse_moe.gate")[0].megatron == "decoder.layers.0.mlp.router"
    assert [global_expert_index(j, 8, 1, 2) for j in range(4)] == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="local expert 4"):
        global_expert_index(4, 8, 1, 2)


def _mixtral_config(**change) -> dict:
    return tiny_mixtral(**MIXTRAL_KW).config.to_dict() | change


def test_moe_router_settings() -> None:
    config = transformer_config_from_hf(_mixtral_config(), tp=2, sequence_parallel=True, ep=2, etp=1)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 64)
    assert config.moe_router_score_function == "softmax" and not config.moe_router_pre_softmax
    assert config.moe_expert_capacity_factor is None and config.moe_token_dispatcher_type == "alltoall"
    assert (config.expert_model_parallel_size, config.expert_tensor_parallel_size) == (2, 1)
    assert config.moe_aux_loss_coeff == 0.0  # transformers adds it only with output_router_logits
    aux = transformer_config_from_hf(_mixtral_config(output_router_logits=True, router_aux_loss_coef=0.02))
    assert aux.moe_aux_loss_coeff == 0.02
    assert transformer_config_from_hf(_mixtral_config(), moe_aux_loss_coeff=0.5).moe_aux_loss_coeff == 0.5


@pytest.mark.parametrize(
    "change,layout,match",
    [
        ({}, dict(ep=3), r"num_local_experts \(4\) is not divisible by the expert-parallel size ep=3"),
        ({}, dict(ep=1, etp=3), r"intermediate_size \(64\) is not divisible by the expert-tensor-parallel size etp=3"),
        ({}, dict(tp=2, ep=2), r"ep=2 with tp=2 needs sequence_parallel"),
        ({"num_experts_per_tok": 5}, {}, r"num_local_experts=4 / num_experts_per_tok=5"),
        ({"router_jitter_noise": 0.1}, {}, r"router_jitter_noise=0.1: router jitter noise is not supported"),
        ({"shared_expert_intermediate_size": 32}, {}, r"shared_expert_intermediate_size=32: shared experts"),
        ({"n_group": 8, "topk_group": 4}, {}, r"n_group=8: grouped \(device-limited\) routing"),
        ({"model_type": "qwen2_moe"}, {}, r"model_type 'qwen2_moe' is not supported: .*shared experts"),
        ({"model_type": "deepseek_v3"}, {}, r"model_type 'deepseek_v3' is not supported: .*grouped routing"),
        ({"model_type": "gpt_oss"}, {}, r"model_type 'gpt_oss' is not supported: .*attention sinks"),
        ({"model_type": "olmoe"}, {}, r"model_type 'olmoe' is not supported by the Llama-family bridge"),
    ],
)
def test_bad_moe_configs_raise_naming_the_field(change: dict, layout: dict, match: str) -> None:
    with pytest.raises(UnsupportedCheckpointError, match=match):
        transformer_config_from_hf(_mixtral_config(**change), **layout)


def test_build_refuses_bad_expert_layout_before_any_process_group(mixtral: dict) -> None:
    assert not dist.is_initialized()  # in this (parent) process: the error comes first
    with pytest.raises(UnsupportedCheckpointError, match="not divisible by the expert-parallel size ep=3"):
        build_megatron_gpt(mixtral["per_expert"], ep=3)
    with pytest.raises(UnsupportedCheckpointError, match="needs a mixture-of-experts model"):
        config = json.load(open(os.path.join(mixtral["per_expert"], "config.json")))
        transformer_config_from_hf(config | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, ep=2)


def _bytes_read(hf_dir: str, ep: int) -> int:
    from dist_lora.bridges import CheckpointReader

    read: list[int] = []
    original_close = CheckpointReader.close

    def close(self: CheckpointReader) -> None:  # this forked rank's reader only
        read.append(self.bytes_read)
        original_close(self)

    CheckpointReader.close = close  # type: ignore[method-assign]
    build_megatron_gpt(hf_dir, ep=ep, etp=1)
    return sum(read)


@pytest.mark.parametrize("layout", ["per_expert", "v5"])
def test_each_expert_parallel_rank_reads_only_its_experts(mixtral: dict, layout: str) -> None:
    state = load_file(os.path.join(mixtral[layout], "model.safetensors"))
    experts = sum(t.numel() * t.element_size() for k, t in state.items() if ".experts." in k)
    rest = sum(t.numel() * t.element_size() for k, t in state.items() if ".experts." not in k)
    assert run_distributed(_bytes_read, 2, ep=2, etp=1, args=(mixtral[layout], 2)) == [rest + experts // 2] * 2


def test_grouped_gemm_experts_refused() -> None:
    with pytest.raises(UnsupportedCheckpointError, match="moe_grouped_gemm=True is not supported"):
        transformer_config_from_hf(_mixtral_config(), moe_grouped_gemm=True)


def test_missing_expert_tensors_named_with_both_layouts(mixtral: dict, tmp_path) -> None:
    from tests.harness import DistributedError

    state = load_file(os.path.join(mixtral["v5"], "model.safetensors"))
    del state["model.layers.0.mlp.experts.down_proj"]
    shutil.copy(os.path.join(mixtral["v5"], "config.json"), tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DistributedError, match=r"block_sparse_moe.experts.0.w2.weight'\] \(per-expert layout\) nor "
                                                r"'model.layers.0.mlp.experts.down_proj' \(transformers 5 layout\)"):
        run_distributed(build_megatron_gpt, 2, ep=2, etp=1, args=(str(tmp_path),), kwargs=dict(ep=2))
