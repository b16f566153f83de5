"""Per-rank sharded adapter checkpoints: every tensor written once with its global shape and
offsets; a checkpoint saved at one TP size loads exactly at another; incomplete or corrupt
checkpoints are refused with errors that name what is wrong."""

from __future__ import annotations

import json
import os

import pytest
import torch
from megatron.core import parallel_state
from safetensors import safe_open

from dist_lora import ConfigError, LoraConfig, get_lora_model
from dist_lora.checkpoint.sharded import load_sharded, read_manifest, save_sharded
from tests.harness import run_distributed
from tests.models import build_tiny_gpt, gpt_loss, random_batch, tiny_gpt_config
from tests.tp_utils import gather_param

MODEL = dict(num_attention_heads=8, num_query_groups=4)
LORA = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_bias=True)


def _model(sp: bool, seed: int):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return get_lora_model(build_tiny_gpt(tiny_gpt_config(tp, sp, add_bias_linear=True, **MODEL)), LORA, seed=seed)


def _gathered(model) -> dict[str, torch.Tensor]:
    return {n: gather_param(p) for n, p in model.named_parameters() if ".lora_" in n}


def _save(directory: str) -> tuple[dict, float]:
    model = _model(sp=True, seed=0)
    tokens, labels = random_batch(0)
    save_sharded(model, directory)
    return _gathered(model), gpt_loss(model, tokens, labels).item()


def _load(directory: str) -> tuple[dict, float]:
    model = _model(sp=False, seed=99)  # a different init, overwritten by the load
    load_sharded(model, directory)
    tokens, labels = random_batch(0)
    return _gathered(model), gpt_loss(model, tokens, labels).item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict, float]:
    directory = str(tmp_path_factory.mktemp("ckpt") / "adapter")
    adapters, loss = run_distributed(_save, 2, tp=2, args=(directory,))[0]
    return directory, adapters, loss


def test_layout_and_manifest(saved) -> None:
    directory, adapters, _ = saved
    assert sorted(os.listdir(directory)) == [
        "adapter_config.json", "manifest.json", "shard-pp000-tp000.safetensors", "shard-pp000-tp001.safetensors",
    ]
    manifest = read_manifest(directory)
    assert manifest["layout"] == {"tp": 2, "pp": 1, "world": 2}
    counts: dict[str, int] = {}
    for name, info in manifest["files"].items():
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            assert sorted(f.keys()) == sorted(info["tensors"])
        for entry in info["tensors"].values():
            counts[entry["key"]] = counts.get(entry["key"], 0) + 1
    qkv = "decoder.layers.0.self_attention.linear_qkv"
    assert counts[f"{qkv}.lora_A.weight"] == 1, "replicated A must be written once"
    assert counts[f"{qkv}.lora_B.weight"] == 2, "B is sharded over 2 TP ranks"
    assert counts["decoder.layers.1.mlp.linear_fc1.lora_B.weight"] == 4, "strided fc1 B: 2 ranks × [gate; up]"
    assert counts["decoder.layers.1.mlp.linear_fc2.lora_A.weight"] == 2
    assert len(counts) == len(adapters)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_loads_exactly_at_any_tp(saved, tp: int) -> None:
    directory, adapters, loss = saved
    loaded, loaded_loss = run_distributed(_load, tp, tp=tp, args=(directory,))[0]
    assert set(loaded) == set(adapters)
    for name, tensor in adapters.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded_loss == pytest.approx(loss, rel=1e-5)


def _load_expecting_error(directory: str) -> str:
    model = _model(sp=False, seed=1)
    before = _gathered(model)
    try:
        load_sharded(model, directory)
    except ConfigError as e:
        after = _gathered(model)
        assert all(torch.equal(before[n], after[n]) for n in before), "a failed load changed the model"
        return str(e)
    return "no error"


def _copy(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(saved, tmp_path) -> None:
    directory = _copy(saved[0], str(tmp_path / "ckpt"))
    os.remove(os.path.join(directory, "shard-pp000-tp001.safetensors"))
    with pytest.raises(ConfigError, match="missing shard-pp000-tp001.safetensors"):
        read_manifest(directory)
    message = run_distributed(_load_expecting_error, 1, args=(directory,))[0]
    assert "shard-pp000-tp001" in message


def test_checksum_mismatch_names_the_file(saved, tmp_path) -> None:
    directory = _copy(saved[0], str(tmp_path / "ckpt"))
    path = os.path.join(directory, "shard-pp000-tp000.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ConfigError, match="checksum mismatch for .*shard-pp000-tp000"):
        read_manifest(directory)


def test_incomplete_checkpoint_without_manifest_is_refused(saved, tmp_path) -> None:
    directory = _copy(saved[0], str(tmp_path / "ckpt"))
    os.remove(os.path.join(directory, "manifest.json"))
    with pytest.raises(ConfigError, match="incomplete"):
        read_manifest(directory)


def test_checkpoint_of_another_model_is_refused(saved, tmp_path) -> None:
    directory = _copy(saved[0], str(tmp_path / "ckpt"))
    manifest_path = os.path.join(directory, "manifest.json")
    manifest = json.load(open(manifest_path))
    for info in manifest["files"].values():
        for entry in info["tensors"].values():
            entry["global_shape"] = [s + 1 for s in entry["global_shape"]]
    json.dump(manifest, open(manifest_path, "w"))
    message = run_distributed(_load_expecting_error, 1, args=(directory,))[0]
    assert "global shape" in message
