"""``dist-lora consolidate --for vllm|sglang`` and ``dist-lora inspect``: the engine release has
no rank/alpha patterns, one global scaling, and gives the real PEFT the same logits as the
``--for peft`` release; what an engine cannot serve is refused before anything is written."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from dist_lora import LoraConfig, get_lora_model  # noqa: E402
from dist_lora.checkpoint.sharded import save_sharded  # noqa: E402
from dist_lora.cli import main as cli_main  # noqa: E402
from dist_lora.release.consolidate import consolidate  # noqa: E402
from dist_lora.release.errors import ConsolidationError  # noqa: E402
from dist_lora.release.inspect import inspect_adapter  # noqa: E402
from tests.hf_models import MEGATRON_LLAMA  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
CASES = {
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 16}),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 2},
                            alpha_pattern={"q_proj": 3}),
    # EVA redistributes ranks: r is the budget, the modules get others (explicit per-module ranks)
    "eva_like": dict(r=8, lora_alpha=8, rank_pattern={"model.layers.0.self_attn.q_proj": 12,
                                                      "model.layers.1.self_attn.v_proj": 3, "down_proj": 5}),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**dict(MEGATRON_LLAMA, tie_word_embeddings=False)))
    directory = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(directory)
    return directory


def _ids() -> torch.Tensor:
    return torch.randint(128, (2, 16), generator=torch.Generator().manual_seed(7))


def _checkpoint(hf_dir: str, directory, lora: dict) -> str:
    config = LoraConfig(target_modules=TARGETS, init_lora_weights=False, **lora)
    model = get_lora_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), config, seed=0)
    save_sharded(model, directory)
    return str(directory)


def _peft_logits(hf_dir: str, adapter_dir: str) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), adapter_dir)
    with torch.no_grad():
        return model.eval()(input_ids=_ids()).logits


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_release_has_one_scaling_and_peft_logits(case, hf_dir, tmp_path, capsys) -> None:
    ckpt = _checkpoint(hf_dir, tmp_path / "ckpt", CASES[case])
    peft_out = consolidate(ckpt, tmp_path / "peft", hf_model_dir=hf_dir, show_progress=False)
    vllm_out = str(tmp_path / "vllm")
    assert cli_main(["consolidate", ckpt, vllm_out, "--hf-model", hf_dir, "--for", "vllm", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    config = json.load(open(os.path.join(vllm_out, "adapter_config.json")))
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and config["use_rslora"] is False
    # every module padded to the largest rank (exact), alpha kept
    assert (config["r"], config["lora_alpha"]) == (12 if case == "eva_like" else 4, CASES[case]["lora_alpha"])
    want = _peft_logits(hf_dir, peft_out)
    torch.testing.assert_close(_peft_logits(hf_dir, vllm_out), want, atol=1e-5, rtol=0)
    # The folding is visible: some module's B was rescaled (its trained scaling != the global one).
    before, after = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (peft_out, vllm_out))
    assert any(not torch.equal(after[k][:, : v.shape[1]], v) for k, v in before.items() if ".lora_B." in k)
    rank = 16 if case == "eva_like" else 8
    assert f"vLLM: set max_lora_rank >= {rank}" in printed
    report = inspect_adapter(vllm_out, "vllm")
    assert report.problems == [] and report.max_lora_rank == rank
    assert inspect_adapter(peft_out, "vllm").problems  # the unfolded release is not served as trained


def test_sglang_release(hf_dir, tmp_path) -> None:
    ckpt = _checkpoint(hf_dir, tmp_path / "ckpt", CASES["patterns"])
    peft_out = consolidate(ckpt, tmp_path / "peft", hf_model_dir=hf_dir, show_progress=False)
    out = consolidate(ckpt, tmp_path / "sglang", hf_model_dir=hf_dir, show_progress=False, target="sglang",
                      dtype=torch.float32)
    torch.testing.assert_close(_peft_logits(hf_dir, out), _peft_logits(hf_dir, peft_out), atol=1e-5, rtol=0)


def _edit_config(ckpt: str, **changes) -> None:
    path = os.path.join(ckpt, "adapter_config.json")
    json.dump({**json.load(open(path)), **changes}, open(path, "w"))


@pytest.mark.parametrize("target", ["vllm", "sglang"])
@pytest.mark.parametrize(
    "change, rule, advice",
    [
        (dict(use_dora=True), "does not serve DoRA", "dist-lora merge"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save=None", "dist-lora merge"),
        (dict(lora_bias=True), "bias='none' without lora_bias", "dist-lora merge"),
        (dict(bias="all"), "bias='none' without lora_bias", "dist-lora merge"),
        (dict(layer_replication=[[0, 2], [0, 2]]), "layer_replication names layers", "dist-lora merge"),
        (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 1}), "LoftQ", "serve it with PEFT on that base"),
    ],
)
def test_engine_refusals_name_the_rule(change, rule, advice, target, hf_dir, tmp_path, capsys) -> None:
    ckpt = _checkpoint(hf_dir, tmp_path / "ckpt", dict(r=4, lora_alpha=8))
    _edit_config(ckpt, **change)
    out = tmp_path / "out"
    with pytest.raises(ConsolidationError, match=rule) as info:
        consolidate(ckpt, out, hf_model_dir=hf_dir, show_progress=False, target=target)
    assert advice in str(info.value) and ("vLLM" if target == "vllm" else "SGLang") in str(info.value)
    assert not out.exists()
    assert cli_main(["consolidate", ckpt, str(out), "--for", target, "--no-progress"]) == 2
    assert rule in capsys.readouterr().err and not out.exists()


def test_rank_above_every_max_lora_rank_and_bad_target(hf_dir, tmp_path) -> None:
    ckpt = _checkpoint(hf_dir, tmp_path / "ckpt", dict(r=4, lora_alpha=8))
    peft_out = consolidate(ckpt, tmp_path / "peft", show_progress=False)
    _edit_config(peft_out, r=600)
    report = inspect_adapter(peft_out, "vllm")
    assert report.max_lora_rank is None and any("largest max_lora_rank 512" in p for p in report.problems)
    with pytest.raises(ConsolidationError, match="must be one of"):
        consolidate(ckpt, tmp_path / "x", target="tgi")
    with pytest.raises(ConsolidationError, match="format 'peft'"):
        consolidate(ckpt, tmp_path / "x", target="vllm", format="megatron")
    assert not (tmp_path / "x").exists()


def test_inspect_cli(hf_dir, tmp_path, capsys) -> None:
    ckpt = _checkpoint(hf_dir, tmp_path / "ckpt", CASES["patterns"])
    out = consolidate(ckpt, tmp_path / "peft", hf_model_dir=hf_dir, show_progress=False)
    assert cli_main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "targets: down_proj, o_proj, q_proj, v_proj" in text and "ranks: 2 x2, 4 x6" in text
    assert "scalings: 2 x4, 4 x4" in text and "dtype: float32" in text and "vLLM" not in text
    assert cli_main(["inspect", out, "--for", "vllm"]) == 0
    text = capsys.readouterr().out
    assert "vLLM: would NOT serve it as trained" in text and "consolidate --for vllm" in text
    assert "set max_lora_rank >= 8" in text
    assert cli_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "dist-lora inspect: error:" in capsys.readouterr().err


def test_sglang_refuses_moe_expert_adapters() -> None:
    from dist_lora.release.serving import ENGINES, check_servable

    experts = ["model.layers.0.mlp.experts.0.down_proj"]
    check_servable(LoraConfig(r=4), ENGINES["vllm"], experts)  # vLLM: no such rule
    with pytest.raises(ConsolidationError, match="SGLang expects MoE expert adapters in its own layout"):
        check_servable(LoraConfig(r=4), ENGINES["sglang"], experts)


def test_unconverted_pissa_adapter_is_not_served(hf_dir, tmp_path) -> None:
    """A PEFT-written PiSSA/OLoRA/CorDA adapter (not converted) is only right on its rewritten
    base: inspect says so and the engine release is refused (vLLM refuses it too)."""
    from dist_lora.release.serving import ENGINES, write_for_engine

    ckpt = _checkpoint(hf_dir, tmp_path / "ckpt", dict(r=4, lora_alpha=8))
    peft_out = consolidate(ckpt, tmp_path / "peft", show_progress=False)
    _edit_config(peft_out, init_lora_weights="pissa")
    assert any("PiSSA / OLoRA / CorDA" in p and "--initial" in p for p in inspect_adapter(peft_out, "vllm").problems)
    with pytest.raises(ConsolidationError, match="PiSSA / OLoRA / CorDA"):
        write_for_engine(peft_out, str(tmp_path / "out"), ENGINES["vllm"])
    assert not (tmp_path / "out").exists()
