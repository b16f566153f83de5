"""``dist-lora consolidate``: a sharded adapter checkpoint from a megatron model at TP=2 (SP on
and off) and TP=2 × PP=2, built from a tiny HF Llama (GQA) / Qwen2 (qkv biases) / Qwen3 (q/k norms,
head_dim != hidden/heads) and fine-tuned,
becomes one adapter that the real ``peft.PeftModel.from_pretrained`` loads onto the HF model
with the same logits (fp32, atol 1e-4); every key names a module of the HF model with its
shape; rank/alpha patterns survive; the megatron format reloads into a TP=2 model; bad input
fails with an error that names the problem and leaves OUT_DIR as it was."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from dist_lora import LoraConfig, get_lora_model  # noqa: E402
from dist_lora.bridges import build_megatron_gpt  # noqa: E402
from dist_lora.release.consolidate import consolidate  # noqa: E402
from dist_lora.release.errors import ConsolidationError  # noqa: E402
from dist_lora.checkpoint.sharded import save_sharded, sha256_file  # noqa: E402
from dist_lora.cli import main as cli_main  # noqa: E402
from dist_lora.model import LoraModel  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import MEGATRON_LLAMA  # noqa: E402
from tests.models import train_lora  # noqa: E402
from tests.tp_utils import gather_tp  # noqa: E402

VOCAB, BATCH, SEQ = 128, 2, 16
COMMON = dict(MEGATRON_LLAMA, tie_word_embeddings=False)
LORA = dict(
    r=4,
    lora_alpha=8,
    init_lora_weights=False,  # B != 0 from the start, so every factor shows in the logits
    rank_pattern={"linear_fc2": 2},
    alpha_pattern={"linear_proj": 16},
)
# name -> (HF model, tp, pp, sequence parallel, extra LoraConfig fields, AdamW steps)
CASES = {
    "llama_tp2": ("llama", 2, 1, False, {}, 2),
    "qwen2_tp2_sp": ("qwen2", 2, 1, True, {"lora_bias": True}, 2),
    "llama_tp2_pp2": ("llama", 2, 2, False, {}, 0),
    "qwen3_tp2_sp": ("qwen3", 2, 1, True, {}, 2),
}
# kind -> (HF class, config class, config fields besides COMMON)
HF_MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 12}),
}


def _ids() -> torch.Tensor:
    return torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    out = {}
    for kind, (cls, config_cls, extra) in HF_MODELS.items():
        torch.manual_seed(0)
        model = cls(config_cls(**COMMON, **extra))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # HF zeroes biases and sets q/k norms to 1: give them values
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
                elif name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen))
        directory = tmp_path_factory.mktemp(kind)
        model.save_pretrained(directory)
        out[kind] = str(directory)
    return out


# ---------------------------------------------------------------------------------------------
# The megatron side (inside run_distributed)


def _megatron_forward(model, tp: int, pp: int, sp: bool):
    """Full logits [b, s, vocab] on the last PP stage (None elsewhere)."""
    ids = _ids()
    with torch.no_grad():
        if pp > 1 and not parallel_state.is_pipeline_first_stage():
            hidden = torch.empty(SEQ // tp if sp else SEQ, BATCH, COMMON["hidden_size"])
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.model.set_input_tensor(hidden)
        out = model(ids, None, None)
        if pp > 1 and not parallel_state.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
    return gather_tp(out, dim=-1)


def _train_and_save(hf_dir: str, ckpt_dir: str, tp: int, pp: int, sp: bool, lora: dict, steps: int):
    model = get_lora_model(build_megatron_gpt(hf_dir, tp=tp, pp=pp, sequence_parallel=sp), LoraConfig(**lora), seed=0)
    optimizer = train_lora(model, steps)  # (pp == 1 when steps > 0)
    model.eval()
    logits = _megatron_forward(model, tp, pp, sp)
    save_sharded(model, ckpt_dir, optimizer=optimizer if steps else None)  # optimizer files: ignored
    return logits


_RUNS: dict[str, tuple[str, torch.Tensor]] = {}


@pytest.fixture(scope="module")
def run(hf_dirs, tmp_path_factory):
    """case -> (checkpoint dir, megatron logits); each case is trained once, on first use."""

    def get(case: str) -> tuple[str, torch.Tensor]:
        if case not in _RUNS:
            kind, tp, pp, sp, extra, steps = CASES[case]
            ckpt = str(tmp_path_factory.mktemp(case) / "ckpt")
            results = run_distributed(
                _train_and_save, tp * pp, tp=tp, pp=pp, args=(hf_dirs[kind], ckpt, tp, pp, sp, {**LORA, **extra}, steps)
            )
            logits = [r for r in results if r is not None]
            assert len(logits) == tp and all(torch.equal(x, logits[0]) for x in logits)
            _RUNS[case] = (ckpt, logits[0])
        return _RUNS[case]

    yield get
    _RUNS.clear()


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _check_keys_name_hf_modules(adapter_dir: str, hf_dir: str) -> dict[str, torch.Tensor]:
    """Every key names a module of the HF model (built on meta from config.json), right shapes."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
    for key, tensor in tensors.items():
        assert key.startswith("base_model.model."), key
        if ".lora_" not in key:  # modules_to_save: a parameter of the module, as is
            assert tensor.shape == model.get_parameter(key.removeprefix("base_model.model.")).shape, key
            continue
        module_name, factor, param = key.removeprefix("base_model.model.").rsplit(".", 2)
        module = model.get_submodule(module_name)  # raises if there is no such module
        assert isinstance(module, torch.nn.Linear), key
        if factor == "lora_A":
            want = (tensor.shape[0], module.in_features)
        else:
            want = (module.out_features, tensor.shape[1]) if param == "weight" else (module.out_features,)
        assert tuple(tensor.shape) == want, key
    return tensors


# ---------------------------------------------------------------------------------------------
# Parity with the real PEFT


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_consolidated_adapter_with_megatron_logits(case, run, hf_dirs, tmp_path) -> None:
    ckpt, megatron_logits = run(case)
    kind, tp, pp, sp, extra, _ = CASES[case]
    hf_dir = hf_dirs[kind]
    out = str(tmp_path / "adapter")
    assert consolidate(ckpt, out, hf_model_dir=hf_dir, show_progress=False) == out
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = _check_keys_name_hf_modules(out, hf_dir)

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    base_logits = _hf_logits(base)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    got = _hf_logits(peft_model)
    assert (megatron_logits - base_logits).abs().max() > 0.1, "the adapter must change the logits visibly"
    torch.testing.assert_close(got, megatron_logits, atol=1e-4, rtol=0)

    # PEFT used every key of the file (it silently ignores unknown ones) and nothing else.
    used = get_peft_model_state_dict(peft_model)
    assert set(used) == set(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(used[key], tensor), key

    # Config: explicit HF module names, per-module rank/alpha as trained, a released file.
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    layers = range(COMMON["num_hidden_layers"])
    modules = {
        f"model.layers.{i}.{m}"
        for i in layers
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert config["target_modules"] == sorted(modules)
    assert config["rank_pattern"] == {f"model.layers.{i}.mlp.down_proj": 2 for i in layers}
    assert config["alpha_pattern"] == {f"model.layers.{i}.self_attn.o_proj": 16 for i in layers}
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (4, 8, True)
    assert config["base_model_name_or_path"] == hf_dir and config["peft_type"] == "LORA"
    assert config["layers_to_transform"] is None and config["megatron_config"] is None
    assert config["lora_bias"] == extra.get("lora_bias", False)
    layer = peft_model.base_model.model.model.layers[1]
    assert layer.mlp.down_proj.r["default"] == 2 and layer.mlp.down_proj.scaling["default"] == 4.0
    assert layer.self_attn.o_proj.scaling["default"] == 4.0 and layer.self_attn.k_proj.scaling["default"] == 2.0
    # A fused QKV factor A is shared: q, k and v get the same A; B is split per query group.
    prefix = "base_model.model.model.layers.0.self_attn."
    assert torch.equal(tensors[prefix + "q_proj.lora_A.weight"], tensors[prefix + "v_proj.lora_A.weight"])
    head_dim = HF_MODELS[kind][2].get("head_dim", 8)
    assert tensors[prefix + "q_proj.lora_B.weight"].shape == (COMMON["num_attention_heads"] * head_dim, 4)
    assert tensors[prefix + "k_proj.lora_B.weight"].shape == (COMMON["num_key_value_heads"] * head_dim, 4)


def test_plain_hf_model_checkpoint_is_joined_and_prefixed(hf_dirs, tmp_path) -> None:
    """A dist_lora checkpoint of an HF model (keys are HF module names): no mapping needed."""
    hf_dir = hf_dirs["qwen2"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, rank_pattern={"down_proj": 2})
    model = get_lora_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), config, seed=0).eval()
    want = _hf_logits(model)
    save_sharded(model, tmp_path / "ckpt")
    out = consolidate(tmp_path / "ckpt", tmp_path / "adapter", hf_model_dir=hf_dir, show_progress=False)
    _check_keys_name_hf_modules(out, hf_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), out)
    torch.testing.assert_close(_hf_logits(peft_model.eval()), want, atol=1e-5, rtol=0)
    saved = json.load(open(os.path.join(out, "adapter_config.json")))
    assert sorted(saved["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert saved["rank_pattern"] == {"down_proj": 2}


def test_modules_to_save_are_mapped(run, hf_dirs, tmp_path) -> None:
    """modules_to_save tensors (global megatron names, e.g. a vocab-sharded output_layer saved
    in two pieces) get HF names. (A megatron model cannot train modules_to_save yet: the
    wrapper deep-copies a module holding a process group, so the pieces are added by hand.)"""
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    head = torch.randn(VOCAB, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    path, manifest = _manifest(ckpt)
    for tp, rows in enumerate(head.chunk(2)):
        name = f"extra-tp{tp}.safetensors"
        save_file({"output_layer.weight": rows.contiguous()}, os.path.join(ckpt, name), metadata={"format": "pt"})
        entry = {"key": "output_layer.weight", "global_shape": [VOCAB, 64], "offsets": [64 * tp, 0],
                 "shape": [64, 64], "dtype": "float32"}
        sha = sha256_file(os.path.join(ckpt, name))
        manifest["files"][name] = {"sha256": sha, "tensors": {"output_layer.weight": entry}}
    json.dump(manifest, open(path, "w"))
    _edit_config(ckpt, modules_to_save=["output_layer"])
    out = consolidate(ckpt, tmp_path / "adapter", hf_model_dir=hf_dirs["llama"], show_progress=False)
    _check_keys_name_hf_modules(out, hf_dirs["llama"])
    assert json.load(open(os.path.join(out, "adapter_config.json")))["modules_to_save"] == ["lm_head"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dirs["llama"]), out)
    assert torch.equal(peft_model.base_model.model.lm_head.modules_to_save["default"].weight, head)


def _load_megatron_format(hf_dir: str, adapter_dir: str):
    model = build_megatron_gpt(hf_dir, tp=2)
    model = LoraModel.from_pretrained(model, adapter_dir).eval()
    return _megatron_forward(model, 2, 1, False)


def test_megatron_format_reloads_at_tp2(run, hf_dirs, tmp_path) -> None:
    ckpt, megatron_logits = run("llama_tp2")
    out = consolidate(ckpt, tmp_path / "megatron", format="megatron", show_progress=False)
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    qkv = "base_model.model.decoder.layers.1.self_attention.linear_qkv"
    assert tensors[f"{qkv}.lora_B.weight"].shape == (128, 4)  # (8 + 2·4) heads × 8: TP=1 layout
    assert tensors["base_model.model.decoder.layers.0.mlp.linear_fc2.lora_A.weight"].shape == (2, 128)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["rank_pattern"] == {"linear_fc2": 2} and config["init_lora_weights"] is True
    logits = run_distributed(_load_megatron_format, 2, tp=2, args=(hf_dirs["llama"], out))[0]
    torch.testing.assert_close(logits, megatron_logits, atol=1e-5, rtol=0)


def test_cli(run, hf_dirs, tmp_path, capsys) -> None:
    ckpt, _ = run("llama_tp2")
    out = str(tmp_path / "cli")
    assert cli_main(["consolidate", ckpt, out, "--hf-model", hf_dirs["llama"]]) == 0  # with a progress bar
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert cli_main(["consolidate", ckpt, out, "--hf-model", hf_dirs["llama"], "--no-progress"]) == 2  # bad input: exit code 2, as argparse
    err = capsys.readouterr().err
    assert "is not empty; pass --overwrite" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and OUT_DIR as it was


def _copy(ckpt: str, tmp_path) -> str:
    return shutil.copytree(ckpt, str(tmp_path / "ckpt"))


def _fails(ckpt: str, out: str, match: str, **kwargs) -> None:
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    with pytest.raises(ConsolidationError, match=match):
        consolidate(ckpt, out, show_progress=False, **kwargs)
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before
    parent = os.path.dirname(os.path.abspath(out))
    assert not [n for n in os.listdir(parent) if ".partial-" in n or ".old-" in n], "staging left behind"


def _manifest(ckpt: str) -> tuple[str, dict]:
    path = os.path.join(ckpt, "manifest.json")
    return path, json.load(open(path))


def _edit_config(ckpt: str, **changes) -> None:
    """Change the checkpoint's adapter_config.json on purpose: the manifest records its new sha256."""
    config = LoraConfig.from_pretrained(ckpt)
    for field, value in changes.items():
        setattr(config, field, value)
    config_path = config.save_pretrained(ckpt)
    path, manifest = _manifest(ckpt)
    manifest["config"]["adapter_config.json"]["sha256"] = sha256_file(config_path)
    json.dump(manifest, open(path, "w"))


def test_missing_shard_names_rank_and_tensor(run, hf_dirs, tmp_path) -> None:
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    out, hf = str(tmp_path / "out"), hf_dirs["llama"]
    os.remove(os.path.join(ckpt, "shard-pp000-tp001.safetensors"))
    _fails(ckpt, out, r"shard-pp000-tp001\.safetensors \(PP stage 0, TP rank 1\) is missing.*decoder\.layers\.",
           hf_model_dir=hf)
    path, manifest = _manifest(ckpt)  # the rank's entry is gone from the manifest too
    del manifest["files"]["shard-pp000-tp001.safetensors"]
    json.dump(manifest, open(path, "w"))
    _fails(ckpt, out, r"tensor decoder\.layers\.\d\.\S+ is incomplete.*no piece from shard-pp000-tp001"
                      r"\.safetensors \(PP stage 0, TP rank 1\)", hf_model_dir=hf)


def test_optimizer_state_files_are_not_needed(run, hf_dirs, tmp_path) -> None:
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    optim = [n for n in os.listdir(ckpt) if n.startswith("optim-")]
    assert optim, "the fixture saves the optimizer state too"
    for name in optim:
        os.remove(os.path.join(ckpt, name))
    consolidate(ckpt, tmp_path / "out", hf_model_dir=hf_dirs["llama"], show_progress=False)


def test_missing_factor_is_named(run, hf_dirs, tmp_path) -> None:
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    path, manifest = _manifest(ckpt)
    qkv_a = "decoder.layers.0.self_attention.linear_qkv.lora_A.weight"
    for info in manifest["files"].values():
        info["tensors"] = {k: e for k, e in info["tensors"].items() if e["key"] != qkv_a}
    json.dump(manifest, open(path, "w"))
    _fails(ckpt, str(tmp_path / "out"), r"decoder\.layers\.0\.self_attention\.linear_qkv has an incomplete "
           r"adapter: missing \['lora_A\.weight'\]", hf_model_dir=hf_dirs["llama"], verify=False)


def test_checksum_mismatch_names_the_file(run, hf_dirs, tmp_path) -> None:
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    path = os.path.join(ckpt, "shard-pp000-tp000.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    _fails(ckpt, str(tmp_path / "out"), r"checksum mismatch for .*shard-pp000-tp000\.safetensors",
           hf_model_dir=hf_dirs["llama"])


@pytest.mark.parametrize("how", ["header", "truncated"])
def test_corrupt_safetensors_is_a_clear_error(run, hf_dirs, tmp_path, how) -> None:
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    path = os.path.join(ckpt, "shard-pp000-tp001.safetensors")
    data = bytearray(open(path, "rb").read())
    if how == "header":
        data[8:16] = b"#garbage"
    else:
        data = data[:-100]
    open(path, "wb").write(bytes(data))
    manifest_path, manifest = _manifest(ckpt)  # as if it was corrupt before the manifest was written
    manifest["files"]["shard-pp000-tp001.safetensors"]["sha256"] = sha256_file(path)
    json.dump(manifest, open(manifest_path, "w"))
    match = r"shard-pp000-tp001\.safetensors is not a valid safetensors file: " + (
        "the header is not JSON" if how == "header" else ".*truncated"
    )
    _fails(ckpt, str(tmp_path / "out"), match, hf_model_dir=hf_dirs["llama"])


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hidden_size": 96}, r"hidden_size: HF hidden_size=96"),
        ({"num_hidden_layers": 1}, r"num_hidden_layers: the HF model has 1 layers, the checkpoint has adapters on "
                                   r"layer 1"),
        ({"num_hidden_layers": 3}, r"num_hidden_layers: the HF model has 3 layers, the checkpoint's adapters stop "
                                   r"at layer 1"),
        ({"num_attention_heads": 4}, r"attention heads: HF num_attention_heads=4, num_key_value_heads=4"),
        ({"intermediate_size": 256}, r"intermediate_size: HF intermediate_size=256"),
    ],
)
def test_mismatching_hf_model_says_which(run, hf_dirs, tmp_path, change, match) -> None:
    ckpt = run("llama_tp2")[0]
    hf = tmp_path / "hf"
    hf.mkdir()
    config = json.load(open(os.path.join(hf_dirs["llama"], "config.json")))
    (hf / "config.json").write_text(json.dumps({**config, **change}))
    _fails(ckpt, str(tmp_path / "out"), match, hf_model_dir=str(hf))


def test_all_linear_config_is_checked_against_the_hf_layers(run, hf_dirs, tmp_path) -> None:
    """The layer-count check applies PEFT's targeting rule (dist_lora.targeting.is_targeted),
    "all-linear" included: an all-linear adapter on 2 layers does not fit a 3-layer HF model."""
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    _edit_config(ckpt, target_modules="all-linear")
    hf = tmp_path / "hf"
    hf.mkdir()
    config = json.load(open(os.path.join(hf_dirs["llama"], "config.json")))
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    _fails(ckpt, str(tmp_path / "out"), r"adapters stop at layer 1 although its config targets layer 2 too",
           hf_model_dir=str(hf))


def test_fused_qkv_needs_the_hf_model(run, tmp_path) -> None:
    _fails(run("llama_tp2")[0], str(tmp_path / "out"), r"linear_qkv.*pass the HF model directory \(--hf-model")


def test_unmapped_megatron_module_needs_megatron_format(run, hf_dirs, tmp_path) -> None:
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    path, manifest = _manifest(ckpt)  # pretend fc2 were an MoE expert, which the bridge does not map
    for info in manifest["files"].values():
        for entry in info["tensors"].values():
            entry["key"] = entry["key"].replace("mlp.linear_fc2", "mlp.experts.linear_fc2")
    json.dump(manifest, open(path, "w"))
    _fails(ckpt, str(tmp_path / "out"), r"experts\.linear_fc2.*no Hugging Face counterpart.*--format megatron",
           hf_model_dir=hf_dirs["llama"])
    out = consolidate(ckpt, tmp_path / "out", format="megatron", show_progress=False)
    assert "base_model.model.decoder.layers.1.mlp.experts.linear_fc2.lora_B.weight" in load_file(
        os.path.join(out, "adapter_model.safetensors"))


def test_config_rank_disagreeing_with_tensors_is_refused(run, hf_dirs, tmp_path) -> None:
    """E.g. a layer-indexed rank_pattern applied to local layer names under PP: the alphas
    written for the HF modules could not be trusted."""
    ckpt = _copy(run("llama_tp2")[0], tmp_path)
    _edit_config(ckpt, rank_pattern={"decoder.layers.1.mlp.linear_fc2": 2})  # layer 0's fc2 has rank 2 too
    _fails(ckpt, str(tmp_path / "out"), r"decoder\.layers\.0\.mlp\.linear_fc2\.lora_A\.weight has rank 2.*rank 4",
           hf_model_dir=hf_dirs["llama"])


def test_non_empty_out_dir_needs_overwrite(run, hf_dirs, tmp_path) -> None:
    ckpt, hf = run("llama_tp2")[0], hf_dirs["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous release")
    _fails(ckpt, str(out), r"is not empty; pass --overwrite", hf_model_dir=hf)
    consolidate(ckpt, out, hf_model_dir=hf, overwrite=True, show_progress=False)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    # overwrite with a failing input: the previous output stays complete and untouched
    broken = _copy(ckpt, tmp_path)
    os.remove(os.path.join(broken, "shard-pp000-tp000.safetensors"))
    _fails(broken, str(out), "is missing", hf_model_dir=hf, overwrite=True)
    load_file(out / "adapter_model.safetensors")
    # an empty directory is fine without --overwrite; the checkpoint itself is never a target
    (tmp_path / "empty").mkdir()
    consolidate(ckpt, tmp_path / "empty", hf_model_dir=hf, show_progress=False)
    with pytest.raises(ConsolidationError, match="must not be"):
        consolidate(ckpt, ckpt, hf_model_dir=hf, overwrite=True, show_progress=False)
