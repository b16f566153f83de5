"""The Llama-family HF -> megatron bridge: a GPTModel built from a saved tiny HF checkpoint
computes the HF model's logits (fp32, atol 1e-4) at TP=1/2/4, SP on and off, PP=2, for Llama
(GQA, untied and tied), Qwen2 (qkv biases, linear RoPE scaling), Mistral (head_dim !=
hidden/heads), Qwen3 (q/k RMSNorm over head_dim != hidden/heads, both attention paths) and
Llama with llama3 RoPE scaling, from single-file and sharded checkpoints.
Also: each rank reads only its slices, the loaded weights and megatron's TP markers match the
HF tensors through the public name/layout helpers, and bad configs fail early and clearly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dist_lora.bridges import (  # noqa: E402
    FAMILIES,
    CheckpointReader,
    ModelFamily,
    UnsupportedCheckpointError,
    build_megatron_gpt,
    hf_features,
    hf_module_names,
    incomplete_adapter,
    megatron_features,
    megatron_module_name,
    merge_gate_up,
    merge_qkv_rows,
    parse_hf_config,
    qkv_shard_row_ranges,
    rows_to_hf,
    split_gate_up,
    split_qkv_rows,
    transformer_config_from_hf,
)
from dist_lora.naming import global_module_name  # noqa: E402
from dist_lora.parallel.tp import shard  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import MEGATRON_LLAMA  # noqa: E402
from tests.tp_utils import gather_param, gather_tp  # noqa: E402

VOCAB, BATCH, SEQ = 128, 2, 16
COMMON = dict(MEGATRON_LLAMA)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False, rope_theta=50000.0)),
    "llama_tied": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True)),
    "llama3_rope": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            )
        ),
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(tie_word_embeddings=False, rope_parameters=dict(rope_type="linear", rope_theta=1e6, factor=2.0)),
    ),
    "mistral": (MistralForCausalLM, MistralConfig, dict(head_dim=16, sliding_window=None)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=12, tie_word_embeddings=False, rope_theta=1e6)),
}


def _hf_model(kind: str, seed: int = 0):
    cls, config_cls, extra = MODELS[kind]
    torch.manual_seed(seed)
    model = cls(config_cls(**COMMON, **extra))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so swaps show
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            elif "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """kind -> {"dir", "logits", "state"}; "llama_sharded" is llama saved in several files."""
    out = {}
    for kind in MODELS:
        model = _hf_model(kind)
        directory = tmp_path_factory.mktemp(kind)
        model.save_pretrained(directory, safe_serialization=True)
        with torch.no_grad():
            logits = model(input_ids=_ids()).logits
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[kind] = {"dir": str(directory), "logits": logits, "state": state}
        if kind == "llama":
            sharded = tmp_path_factory.mktemp("llama_sharded")
            model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
            assert (sharded / "model.safetensors.index.json").is_file()
            out["llama_sharded"] = {**out[kind], "dir": str(sharded)}
    return out


# ---------------------------------------------------------------------------------------------
# Logits parity


def _megatron_logits(hf_dir: str, tp: int, pp: int, sp: bool, attention: str = "megatron"):
    """Full logits [b, s, vocab] on the last PP stage's ranks (None elsewhere)."""
    model = build_megatron_gpt(hf_dir, tp=tp, pp=pp, sequence_parallel=sp, attention=attention).eval()
    ids = _ids()
    with torch.no_grad():
        if pp > 1:  # run the two stages by hand: stage 0's hidden states -> stage 1
            if not parallel_state.is_pipeline_first_stage():
                rows = SEQ // tp if sp else SEQ
                hidden = torch.empty(rows, BATCH, model.config.hidden_size)
                dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            out = model(ids, None, None)
            if not parallel_state.is_pipeline_last_stage():
                dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
                return None
        else:
            out = model(ids, None, None)
    assert out.shape == (BATCH, SEQ, VOCAB // tp), out.shape  # megatron returns [b, s, v/t]
    return gather_tp(out, dim=-1)


# (kind, tp, pp, sp[, attention]): megatron's core attention unless named.
PARITY_CASES = [
    ("llama", 1, 1, False),
    ("llama", 2, 1, False),
    ("llama", 4, 1, False),
    ("llama", 2, 1, True),
    ("llama", 4, 1, True),
    ("llama_sharded", 2, 1, False),
    ("llama_tied", 1, 1, False),
    ("llama_tied", 2, 1, True),
    ("llama3_rope", 2, 1, False),
    ("qwen2", 1, 1, False),
    ("qwen2", 2, 1, True),
    ("qwen2", 4, 1, False),
    ("mistral", 2, 1, False),
    ("qwen3", 1, 1, False),
    ("qwen3", 2, 1, True),
    ("qwen3", 2, 1, True, "sdpa"),
    ("qwen3", 1, 2, False, "sdpa"),
    ("llama", 1, 2, False),
    ("llama_sharded", 2, 2, True),
    ("llama_tied", 2, 2, False),
]


@pytest.mark.parametrize("kind,tp,pp,sp,attention", [(case + ("megatron",))[:5] for case in PARITY_CASES])
def test_logits_match_hf(checkpoints: dict, kind: str, tp: int, pp: int, sp: bool, attention: str) -> None:
    ckpt = checkpoints[kind]
    results = run_distributed(_megatron_logits, tp * pp, tp=tp, pp=pp, args=(ckpt["dir"], tp, pp, sp, attention))
    want = ckpt["logits"]
    assert want.abs().max() > 1.0, "reference logits too small to test the mapping"
    got = [r for r in results if r is not None]
    assert len(got) == tp  # the last stage's TP ranks
    for logits in got:
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Loaded weights, TP markers, slice-only reads, and the name/layout helpers


def _loaded_weights(hf_dir: str, tp: int, pp: int) -> dict:
    read: list[int] = []
    original_close = CheckpointReader.close

    def close(self: CheckpointReader) -> None:  # this forked rank's reader only
        read.append(self.bytes_read)
        original_close(self)

    CheckpointReader.close = close  # type: ignore[method-assign]
    model = build_megatron_gpt(hf_dir, tp=tp, pp=pp)
    weights, markers = {}, {}
    for name, param in model.named_parameters():
        module, suffix = name.rsplit(".", 1)
        global_name = f"{global_module_name(model, module)}.{suffix}"
        weights[global_name] = gather_param(param)  # uses megatron's TP markers
        markers[global_name] = tuple(
            getattr(param, attr, None) for attr in ("tensor_model_parallel", "partition_dim", "partition_stride")
        )
    return {"weights": weights, "markers": markers, "bytes_read": sum(read)}


def _expected_full(state: dict, megatron_param: str, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """The full megatron tensor built from HF tensors with the public helpers."""
    module, suffix = megatron_param.rsplit(".", 1)
    hf = [state[f"{name}.{suffix}"] for name in hf_module_names(module)]
    if module.endswith("linear_qkv"):
        return merge_qkv_rows(*hf, heads, groups, head_dim)
    if module.endswith("linear_fc1"):
        return merge_gate_up(*hf)
    (tensor,) = hf
    return tensor


def test_weights_markers_and_slice_reads_tp2_pp2(checkpoints: dict) -> None:
    ckpt = checkpoints["llama_sharded"]
    tp, pp = 2, 2
    results = run_distributed(_loaded_weights, tp * pp, tp=tp, pp=pp, args=(ckpt["dir"], tp, pp))
    state = ckpt["state"]
    heads, groups, head_dim = COMMON["num_attention_heads"], COMMON["num_key_value_heads"], 8

    # Every HF tensor is loaded exactly once, into the right global layer and layout.
    seen = set()
    for rank, result in enumerate(results):
        for name, got in result["weights"].items():
            want = _expected_full(state, name, heads, groups, head_dim)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"rank {rank}: {name}")
            module, suffix = name.rsplit(".", 1)
            seen.update(f"{hf}.{suffix}" for hf in hf_module_names(module))
            if module.endswith("linear_qkv"):  # the inverse helpers give back HF's q/k/v
                for part, hf_name in zip(split_qkv_rows(got, heads, groups, head_dim), hf_module_names(module)):
                    assert torch.equal(part, state[f"{hf_name}.{suffix}"])
            if module.endswith("linear_fc1"):
                for part, hf_name in zip(split_gate_up(got), hf_module_names(module)):
                    assert torch.equal(part, state[f"{hf_name}.{suffix}"])
    assert seen == set(state), f"not loaded: {set(state) - seen}"
    stage0, stage1 = results[0]["weights"], results[tp]["weights"]
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in stage0
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in stage1  # local index 0, global 1

    # megatron's TP markers (which it skips with perform_initialization=False) are set.
    markers = results[0]["markers"]
    assert markers["decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)
    assert markers["decoder.layers.0.self_attention.linear_qkv.weight"] == (True, 0, 1)
    assert markers["decoder.layers.0.self_attention.linear_proj.weight"] == (True, 1, 1)
    assert markers["decoder.layers.0.mlp.linear_fc2.weight"] == (True, 1, 1)
    assert markers["embedding.word_embeddings.weight"] == (True, 0, 1)
    assert results[tp]["markers"]["output_layer.weight"] == (True, 0, 1)
    assert not markers["decoder.layers.0.input_layernorm.weight"][0]

    # Each rank read only its slices: TP-split tensors once over all ranks, norms once per TP rank.
    total = sum(t.numel() * t.element_size() for t in state.values())
    norms = sum(t.numel() * t.element_size() for n, t in state.items() if "norm" in n)
    assert sum(r["bytes_read"] for r in results) == total + (tp - 1) * norms
    assert max(r["bytes_read"] for r in results) < 0.3 * total


# ---------------------------------------------------------------------------------------------
# Layout helpers on their own


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layout_helpers_agree_with_megatron_sharding(tp: int) -> None:
    heads, groups, head_dim, inp, ffn = 8, 4, 3, 5, 12
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * head_dim, inp, generator=gen) for n in (heads, groups, groups))
    full = merge_qkv_rows(q, k, v, heads, groups, head_dim)
    assert full[: 2 * head_dim].equal(q[: 2 * head_dim]) and full[2 * head_dim : 3 * head_dim].equal(k[:head_dim])
    for rank in range(tp):
        ranges = qkv_shard_row_ranges(heads, groups, head_dim, rank, tp)
        part = merge_qkv_rows(q[ranges[0]], k[ranges[1]], v[ranges[2]], heads // tp, groups // tp, head_dim)
        assert part.equal(shard(full, 0, rank, tp))
    for got, want in zip(split_qkv_rows(full, heads, groups, head_dim), (q, k, v)):
        assert got.equal(want)
    lora_b = torch.randn(full.shape[0], 4, generator=gen)  # [out, r] factors use the same code
    assert merge_qkv_rows(*split_qkv_rows(lora_b, heads, groups, head_dim), heads, groups, head_dim).equal(lora_b)

    gate, up = torch.randn(ffn, inp, generator=gen), torch.randn(ffn, inp, generator=gen)
    master = merge_gate_up(gate, up)
    shards = [shard(master, 0, rank, tp, stride=2) for rank in range(tp)]
    rows = ffn // tp
    for rank, part in enumerate(shards):
        assert part.equal(merge_gate_up(gate[rank * rows : (rank + 1) * rows], up[rank * rows : (rank + 1) * rows]))
    for got, want in zip(split_gate_up(torch.cat(shards), num_shards=tp), (gate, up)):
        assert got.equal(want)


def test_module_name_mapping() -> None:
    assert hf_module_names("decoder.layers.3.self_attention.linear_qkv") == [
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.3.self_attn.v_proj",
    ]
    assert hf_module_names("module.decoder.layers.0.mlp.linear_fc1") == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    ]
    assert hf_module_names("decoder.layers.2.self_attention.linear_proj") == ["model.layers.2.self_attn.o_proj"]
    assert hf_module_names("decoder.layers.2.mlp.linear_fc2") == ["model.layers.2.mlp.down_proj"]
    assert hf_module_names("decoder.layers.2.pre_mlp_layernorm") == ["model.layers.2.post_attention_layernorm"]
    assert hf_module_names("output_layer") == ["lm_head"]
    assert megatron_module_name("base_model.model.model.layers.3.self_attn.v_proj") == (
        "decoder.layers.3.self_attention.linear_qkv",
        2,
    )
    assert megatron_module_name("model.layers.1.mlp.up_proj") == ("decoder.layers.1.mlp.linear_fc1", 1)
    assert megatron_module_name("model.embed_tokens") == ("embedding.word_embeddings", 0)
    with pytest.raises(KeyError, match="linear_qkv"):
        hf_module_names("decoder.layers.0.self_attention.linear_qkv.lora_A")


# ---------------------------------------------------------------------------------------------
# Config translation and errors (no process groups involved)


def _config_dict(kind: str) -> dict:
    cls, config_cls, extra = MODELS[kind]
    return config_cls(**COMMON, **extra).to_dict() | {"architectures": [cls.__name__]}


def test_transformer_config_fields() -> None:
    qwen = transformer_config_from_hf(_config_dict("qwen2"), tp=2, sequence_parallel=True)
    assert qwen.add_qkv_bias and not qwen.add_bias_linear and qwen.gated_linear_unit
    assert (qwen.num_query_groups, qwen.kv_channels, qwen.layernorm_epsilon) == (4, 8, 1e-5)
    assert not qwen.perform_initialization and qwen.sequence_parallel and qwen.tensor_model_parallel_size == 2
    mistral = transformer_config_from_hf(_config_dict("mistral"), pp=2)
    assert mistral.kv_channels == 16 and not mistral.add_qkv_bias and mistral.pipeline_dtype == torch.float32
    # transformers < 5 style: rope_theta + rope_scaling.
    old = _config_dict("llama")
    old.pop("rope_parameters")
    old |= {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    transformer_config_from_hf(old)
    qwen3 = transformer_config_from_hf(_config_dict("qwen3"), tp=2, sequence_parallel=True)
    assert qwen3.qk_layernorm and not qwen3.add_qkv_bias and (qwen3.kv_channels, qwen3.layernorm_epsilon) == (12, 1e-5)
    no_head_dim = _config_dict("qwen3")
    no_head_dim.pop("head_dim")  # transformers' Qwen3Config default (128), not hidden / heads (8)
    assert transformer_config_from_hf(no_head_dim).kv_channels == 128 == Qwen3Config().head_dim
    assert not transformer_config_from_hf(_config_dict("llama")).qk_layernorm
    bf16 = transformer_config_from_hf(_config_dict("llama"), params_dtype=torch.bfloat16)
    assert bf16.params_dtype == bf16.pipeline_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "change,tp,match",
    [
        ({}, 8, r"num_key_value_heads \(query groups\) \(4\) is not divisible by the tensor-parallel size 8"),
        ({}, 3, r"num_attention_heads \(8\) is not divisible by the tensor-parallel size 3"),
        ({"vocab_size": 130}, 4, r"vocab_size \(130\) is not divisible"),
        ({"model_type": "gpt2"}, 1,
         r"model_type 'gpt2' is not supported.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"),
        ({"architectures": ["LlamaForSequenceClassification"]}, 1, r"architectures .* not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, 1,
         r"RoPE type 'yarn' is not supported; supported types: default, linear, llama3"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 2.0, "original_max_position_embeddings": 8192}}, 1,
         r"llama3 RoPE scaling with \{'high_freq_factor': 2.0\}"),
        ({"attention_bias": True}, 1, r"attention_bias=True"),
        ({"hidden_act": "gelu"}, 1, r"hidden_act 'gelu'"),
    ],
)
def test_unsupported_configs_raise(change: dict, tp: int, match: str) -> None:
    with pytest.raises(UnsupportedCheckpointError, match=match):
        transformer_config_from_hf(_config_dict("llama") | change, tp=tp)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"attention_bias": True}, r"attention_bias=True \(biases on q/k/v AND o_proj\)"),
        ({"use_sliding_window": True, "max_window_layers": 0}, r"sliding-window attention"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, r"sliding-window attention"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, r"RoPE type 'yarn'"),
    ],
)
def test_unsupported_qwen3_configs_raise(change: dict, match: str) -> None:
    with pytest.raises(UnsupportedCheckpointError, match=match):
        transformer_config_from_hf(_config_dict("qwen3") | change, tp=2)


def test_sliding_window_raises() -> None:
    with pytest.raises(UnsupportedCheckpointError, match="sliding_window=16"):
        transformer_config_from_hf(_config_dict("mistral") | {"sliding_window": 16})
    with pytest.raises(UnsupportedCheckpointError, match="sliding-window"):
        transformer_config_from_hf(_config_dict("qwen2") | {"use_sliding_window": True})


def test_build_rejects_bad_layout_before_any_process_group(checkpoints: dict, tmp_path) -> None:
    assert not dist.is_initialized()  # in this (parent) process: the error comes first
    with pytest.raises(UnsupportedCheckpointError, match="query groups"):
        build_megatron_gpt(checkpoints["llama"]["dir"], tp=8)
    (tmp_path / "config.json").write_text(json.dumps(_config_dict("llama")))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        CheckpointReader(tmp_path)


# ---------------------------------------------------------------------------------------------
# The family tables: geometry, adapter rows and a new family as one table


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3"])
def test_family_table_geometry(kind: str) -> None:
    arch = parse_hf_config(_config_dict(kind))
    family = FAMILIES[arch.model_type]
    heads, groups, d, hidden, ffn = arch.num_attention_heads, arch.num_query_groups, arch.head_dim, 64, 128
    assert megatron_features(family, arch) == {
        "self_attention.linear_qkv": ((hidden, "hidden"), ((heads + 2 * groups) * d, "q")),
        "self_attention.linear_proj": ((heads * d, "q"), (hidden, "hidden")),
        "mlp.linear_fc1": ((hidden, "hidden"), (2 * ffn, "ffn")),
        "mlp.linear_fc2": ((ffn, "ffn"), (hidden, "hidden")),
    }
    hf = _hf_model(kind)  # every HF linear of a decoder layer, with its real (in, out)
    for sub, (n_in, n_out) in hf_features(family, arch).items():
        linear = hf.get_submodule(f"model.layers.0.{sub}")
        assert (linear.in_features, linear.out_features) == (n_in, n_out), sub
    assert family.qkv_bias == (kind == "qwen2")


def test_adapter_rows_to_hf_split_like_the_layouts() -> None:
    arch = parse_hf_config(_config_dict("llama"))
    qkv = "base_model.model.decoder.layers.1.self_attention.linear_qkv"
    rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    b = torch.randn(rows, 4)
    split = rows_to_hf(qkv, rows, arch.attention)
    assert [hf for hf, _ in split] == hf_module_names(qkv)
    for (_, index), want in zip(split, split_qkv_rows(b, 8, 4, 8)):
        assert b[index].equal(want)
    assert rows_to_hf(qkv, 4, arch.attention, shared=True) == [(hf, None) for hf in hf_module_names(qkv)]
    fc1 = rows_to_hf("decoder.layers.0.mlp.linear_fc1", 10)  # gate_up needs no attention geometry
    assert [index.tolist() for _, index in fc1] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert rows_to_hf("decoder.layers.0.mlp.linear_fc2", 64) == [("model.layers.0.mlp.down_proj", None)]


def test_incomplete_adapter_names_missing_and_unexpected() -> None:
    want = {"lora_A.weight", "lora_B.weight"}
    assert incomplete_adapter("m", set(want), want) is None
    assert incomplete_adapter("m", {"lora_A.weight", "lora_B.bias"}, want, note=" (lora_bias=False)") == (
        "module m has an incomplete adapter: missing ['lora_B.weight']; unexpected ['lora_B.bias'] (lora_bias=False)."
    )


def test_qwen3_is_the_llama_table_plus_head_norms() -> None:
    """A family with per-head q/k norms is one table: Qwen3's is Llama's plus two replicated norms."""
    llama, qwen3 = FAMILIES["llama"], FAMILIES["qwen3"]
    assert isinstance(qwen3, ModelFamily) and qwen3.architecture == "Qwen3ForCausalLM"
    assert qwen3.modules.layer[: len(llama.modules.layer)] == llama.modules.layer
    assert qwen3.modules.model == llama.modules.model
    mapped = qwen3.modules.megatron("decoder.layers.5.self_attention.k_layernorm")
    assert (mapped.hf, mapped.entry.partition) == (("model.layers.5.self_attn.k_norm",), None)
    mapped, position = qwen3.modules.hf("model.layers.2.self_attn.q_norm")
    assert (mapped.megatron, position) == ("decoder.layers.2.self_attention.q_layernorm", 0)
    assert hf_module_names("decoder.layers.1.self_attention.q_layernorm") == ["model.layers.1.self_attn.q_norm"]
    assert qwen3.modules.hf_layer_linears() == llama.modules.hf_layer_linears()  # norms are no LoRA targets
    with pytest.raises(KeyError, match="q_layernorm"):
        llama.modules.megatron("decoder.layers.5.self_attention.q_layernorm")


def test_checkpoint_reader_reads_a_file_and_prefers_the_single_file(tmp_path) -> None:
    """One reader for every HF checkpoint: a path to a .safetensors file reads that file, and a
    directory with both model.safetensors and an index reads model.safetensors (as transformers)."""
    single, shard = {"w": torch.ones(2, 3)}, {"w": torch.zeros(2, 3)}
    save_file(single, str(tmp_path / "model.safetensors"))
    save_file(shard, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    with CheckpointReader(tmp_path) as reader:
        assert reader.read("w").equal(single["w"])
    with CheckpointReader(tmp_path / "model-00001-of-00001.safetensors") as reader:
        assert reader.read("w").equal(shard["w"]) and reader.shape("w") == (2, 3) and "w" in reader
