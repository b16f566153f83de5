"""``dist-lora merge``: a sharded adapter checkpoint of a megatron model at TP=2, built from a
tiny HF Llama (GQA, fused QKV and gated fc1 on the megatron side) and trained two steps,
merged into the HF base checkpoint; transformers loads the output (several shards + index)
with the megatron LoRA model's logits; bad input is refused and leaves OUT_DIR alone."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from dist_lora import LoraConfig, get_lora_model  # noqa: E402
from dist_lora.bridges import build_megatron_gpt  # noqa: E402
from dist_lora.release.merged import MergedExportError, merge_export, parse_size  # noqa: E402
from dist_lora.release.merged_layers import layer_expansion  # noqa: E402
from dist_lora.release.errors import ConsolidationError  # noqa: E402
from dist_lora.checkpoint.sharded import save_sharded  # noqa: E402
from dist_lora.cli import main as cli_main  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import MEGATRON_LLAMA  # noqa: E402
from tests.models import train_lora  # noqa: E402
from tests.tp_utils import gather_tp  # noqa: E402

VOCAB, BATCH, SEQ, TP = 128, 2, 16, 2
LORA = dict(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"linear_fc2": 2}, alpha_pattern={"linear_proj": 16})


def _ids() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _train_and_save(hf_dir: str, ckpt_dir: str, sp: bool = False, lora: dict = LORA) -> torch.Tensor:
    model = get_lora_model(build_megatron_gpt(hf_dir, tp=TP, sequence_parallel=sp), LoraConfig(**lora), seed=0)
    train_lora(model, steps=2)
    model.eval()
    with torch.no_grad():
        logits = gather_tp(model(_ids(), None, None), dim=-1)
    save_sharded(model, ckpt_dir)
    return logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str, torch.Tensor]:
    """(HF base dir, sharded checkpoint dir, megatron LoRA logits)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**MEGATRON_LLAMA, tie_word_embeddings=False))
    hf_dir = str(tmp_path_factory.mktemp("llama"))
    base.save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:  # a stand-in tokenizer file to copy
        json.dump({"model_max_length": 64}, f)
    ckpt = str(tmp_path_factory.mktemp("run") / "ckpt")
    logits = run_distributed(_train_and_save, TP, tp=TP, args=(hf_dir, ckpt))
    assert torch.equal(logits[0], logits[1])
    return hf_dir, ckpt, logits[0]


def _logits(model_dir: str) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        return model(_ids()).logits


def test_cli_merge_matches_megatron_lora_logits(trained, tmp_path, capsys) -> None:
    hf_dir, ckpt, megatron_logits = trained
    out = str(tmp_path / "merged")
    assert cli_main(["merge", ckpt, "--hf-model", hf_dir, out, "--max-shard-size", "100KB", "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left behind
    merged = _logits(out)
    assert (merged - megatron_logits).abs().max().item() < 1e-4
    assert (_logits(hf_dir) - megatron_logits).abs().max().item() > 1e-2  # the adapter mattered


def test_non_empty_out_dir_needs_overwrite(trained, tmp_path, capsys) -> None:
    hf_dir, ckpt, megatron_logits = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["merge", ckpt, "--hf-model", hf_dir, str(out), "--no-progress"]) == 2  # bad input: exit code 2, as argparse
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    merge_export(ckpt, hf_dir, out, overwrite=True, show_progress=False)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    assert (_logits(str(out)) - megatron_logits).abs().max().item() < 1e-4


def test_bad_input_is_refused(trained, tmp_path) -> None:
    hf_dir, ckpt, _ = trained
    with pytest.raises(MergedExportError, match="base model"):
        merge_export(ckpt, hf_dir, os.path.join(hf_dir, "inside"), show_progress=False)
    with pytest.raises(MergedExportError, match="size"):
        merge_export(ckpt, hf_dir, tmp_path / "x", max_shard_size="lots", show_progress=False)
    assert not (tmp_path / "x").exists()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size(123) == 123


def _qwen2_dir(directory: str) -> str:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**MEGATRON_LLAMA, tie_word_embeddings=False))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF zeroes biases: give the q/k/v biases values
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(directory)
    return directory


def test_qwen2_lora_bias_on_fused_qkv_with_sequence_parallel(tmp_path) -> None:
    """lora_bias on the fused QKV (split into q/k/v weights and biases), TP=2 with SP."""
    hf_dir = _qwen2_dir(str(tmp_path / "qwen2"))
    lora_qkv_bias = dict(LORA, target_modules=["linear_qkv"], lora_bias=True)
    logits = run_distributed(_train_and_save, TP, tp=TP, args=(hf_dir, str(tmp_path / "ckpt"), True, lora_qkv_bias))
    out = merge_export(tmp_path / "ckpt", hf_dir, tmp_path / "merged", max_shard_size="200KB", show_progress=False)
    assert (_logits(out) - logits[0]).abs().max().item() < 1e-4
    # lora_bias on a module whose base has no bias (o_proj) cannot be merged: refused, nothing written
    run_distributed(_train_and_save, TP, tp=TP, args=(hf_dir, str(tmp_path / "ckpt2"), False,
                                                     dict(LORA, target_modules=["linear_proj"], lora_bias=True)))
    with pytest.raises(MergedExportError, match="o_proj.lora_B.bias"):
        merge_export(tmp_path / "ckpt2", hf_dir, tmp_path / "merged2", show_progress=False)
    assert not (tmp_path / "merged2").exists()


def test_dora_checkpoint_merges_to_the_megatron_logits(tmp_path) -> None:
    """DoRA: W' = m / ||W + ΔW||_row · (W + ΔW), exported tensor by tensor."""
    torch.manual_seed(0)
    hf_dir = str(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(**MEGATRON_LLAMA, tie_word_embeddings=False)).save_pretrained(hf_dir)
    ckpt = str(tmp_path / "ckpt")
    lora = dict(LORA, use_dora=True)
    megatron_logits = run_distributed(_train_and_save, TP, tp=TP, args=(hf_dir, ckpt), kwargs={"lora": lora})[0]
    out = str(tmp_path / "merged")
    merge_export(ckpt, hf_dir, out, show_progress=False)
    torch.testing.assert_close(_logits(out), megatron_logits, atol=1e-4, rtol=0)
    assert (_logits(hf_dir) - megatron_logits).abs().max() > 1e-3, "the adapter must change the logits"


@pytest.mark.parametrize("ranges", [
    [[0, 2], [1, 3]],  # 3 layers -> positions [0, 1, 1, 2]: more layers than the base
    [[0, 2], [0, 1]],  # 3 layers -> positions [0, 1, 0]: as many layers as the base, layer 2 dropped
])
def test_layer_replication_merges_into_the_expanded_model(tmp_path, ranges) -> None:
    """layer_replication: position j of the output is base layer source[j] with position j's
    adapter merged; config.json counts the expanded stack; transformers gives the megatron logits."""
    torch.manual_seed(0)
    hf_dir = str(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(**dict(MEGATRON_LLAMA, num_hidden_layers=3), tie_word_embeddings=False)).save_pretrained(hf_dir)
    lora = dict(LORA, layer_replication=ranges)
    megatron_logits = run_distributed(_train_and_save, TP, tp=TP, args=(hf_dir, str(tmp_path / "ckpt")),
                                      kwargs={"lora": lora})[0]
    out = merge_export(tmp_path / "ckpt", hf_dir, tmp_path / "merged", max_shard_size="200KB", show_progress=False)
    positions = sum(end - start for start, end in ranges)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == positions
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert len(model.model.layers) == positions
    torch.testing.assert_close(_logits(out), megatron_logits, atol=1e-4, rtol=0)


def test_layer_replication_refusals_leave_nothing(tmp_path) -> None:
    """A base whose config.json does not match its weights (or has too few layers) is refused before writing."""
    torch.manual_seed(0)
    hf_dir = str(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(**dict(MEGATRON_LLAMA, num_hidden_layers=3), tie_word_embeddings=False)).save_pretrained(hf_dir)
    run_distributed(_train_and_save, TP, tp=TP, args=(hf_dir, str(tmp_path / "ckpt")),
                    kwargs={"lora": dict(LORA, layer_replication=[[0, 2], [0, 1]])})
    config_path = os.path.join(hf_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:  # the weights still have 3 layers
        json.dump(dict(config, num_hidden_layers=2), f)
    with pytest.raises(ConsolidationError, match=r"model\.layers\.2\..* config\.json has only 2 layers"):
        merge_export(tmp_path / "ckpt", hf_dir, tmp_path / "merged", show_progress=False)
    with open(config_path, "w") as f:
        json.dump(dict(config, num_hidden_layers=1), f)
    with pytest.raises(ConsolidationError, match=r"range \[0, 2\] reaches beyond the model's 1 layers"):
        merge_export(tmp_path / "ckpt", hf_dir, tmp_path / "merged", show_progress=False)
    assert not (tmp_path / "merged").exists()


def test_layer_expansion_of_the_config(tmp_path) -> None:
    """config.json: the layer count and Qwen2's per-layer layer_types follow the expanded stack."""
    hf_dir = str(tmp_path / "qwen2")
    Qwen2Config(**dict(MEGATRON_LLAMA, num_hidden_layers=3),
                layer_types=["full_attention", "sliding_attention", "full_attention"]).save_pretrained(hf_dir)
    expansion = layer_expansion(hf_dir, [[1, 3], [0, 2]])
    assert expansion.source == [1, 2, 0, 1] and expansion.stack_prefix == "model.layers."
    assert expansion.config_changes == {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
    }
    names = ["lm_head.weight", "model.layers.0.a.weight", "model.layers.1.a.weight", "model.layers.2.a.weight"]
    assert expansion.tensor_sources(names) == [
        ("lm_head.weight", "lm_head.weight"), ("model.layers.0.a.weight", "model.layers.1.a.weight"),
        ("model.layers.1.a.weight", "model.layers.2.a.weight"), ("model.layers.2.a.weight", "model.layers.0.a.weight"),
        ("model.layers.3.a.weight", "model.layers.1.a.weight"),
    ]
    expansion.write_config(os.path.join(hf_dir, "config.json"))
    assert Qwen2Config.from_pretrained(hf_dir).num_hidden_layers == 4
