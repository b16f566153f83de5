"""``dist-lora consolidate`` on a DeepSpeed checkpoint: a tiny HF Llama with dist_lora LoRA is
trained under DeepSpeed ZeRO-1/2/3 on 2 forked ranks (configs/zero*_cpu.json), saved with
``engine.save_checkpoint``, consolidated here without a process group, and loaded by the real
``peft.PeftModel.from_pretrained`` with the logits of the trained model. Bad input (a missing
rank's partition, a corrupt or unsafe file, no adapter tensors, no config) fails with an error
naming the problem, and OUT_DIR is never created half-written."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from dist_lora.deepspeed import prepare_deepspeed

prepare_deepspeed()

import deepspeed  # noqa: E402  (after prepare_deepspeed; forked ranks inherit the import)
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import peft  # noqa: E402
from peft import PeftModel  # noqa: E402

from dist_lora import LoraConfig, get_lora_model  # noqa: E402
from dist_lora.release.consolidate import consolidate_deepspeed  # noqa: E402
from dist_lora.release.errors import ConsolidationError  # noqa: E402
from dist_lora.cli import BAD_INPUT  # noqa: E402
from dist_lora.cli import main as cli_main  # noqa: E402
from tests.harness import run_distributed  # noqa: E402
from tests.hf_models import load_base, logits, sample_ids, save_base, tiny_llama  # noqa: E402

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
STEPS = 3


def _ds_config(stage: int) -> dict:
    with open(CONFIGS / f"zero{stage}_cpu.json") as f:
        config = json.load(f)
    config.pop("_comment", None)
    config["train_micro_batch_size_per_gpu"] = 2
    return config


def _train(hf_dir: str, stage: int, save_dir: str, kind: str = "dist_lora") -> torch.Tensor:
    """One rank: train, save the DeepSpeed checkpoint (+ adapter_config.json), return the
    trained model's logits on fixed ids (rank 0's; every rank computes them). ``kind``:
    "dist_lora" (LoraModel), "peft" (PEFT's own PeftModel) or "norm_only" (no adapter)."""
    base = load_base(hf_dir)
    lora = kind != "norm_only"
    if kind == "dist_lora":
        model = get_lora_model(base, LoraConfig(**LORA), seed=0)
    elif kind == "peft":
        model = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    else:  # a non-adapter run: only the final norm is trainable
        model = base
        for name, param in model.named_parameters():
            param.requires_grad_(name == "model.norm.weight")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=_ds_config(stage))
    for step in range(STEPS):
        ids = sample_ids(seed=100 * step + dist.get_rank())
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(save_dir)
    if lora and dist.get_rank() == 0:
        model.peft_config["default"].save_pretrained(save_dir)
    engine.eval()
    with torch.no_grad():
        return engine(input_ids=sample_ids()).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    return save_base(tiny_llama(seed=3), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def zero2(hf_dir, tmp_path_factory) -> tuple[str, torch.Tensor]:
    save_dir = str(tmp_path_factory.mktemp("zero2"))
    return save_dir, run_distributed(_train, 2, args=(hf_dir, 2, save_dir))[0]


def _peft_logits(hf_dir: str, adapter_dir: str) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(load_base(hf_dir), adapter_dir).eval(), sample_ids())


def _consolidated_matches(hf_dir: str, save_dir: str, trained: torch.Tensor, out: str) -> None:
    untouched = logits(load_base(hf_dir), sample_ids())
    assert (trained - untouched).abs().max() > 1e-2, "training must have moved the adapter"
    got = _peft_logits(hf_dir, out)
    torch.testing.assert_close(got, trained, rtol=0, atol=1e-5)


def test_zero2_checkpoint_consolidates_to_a_peft_adapter(hf_dir, zero2, tmp_path) -> None:
    save_dir, trained = zero2
    out = str(tmp_path / "adapter")
    assert cli_main(["consolidate", save_dir, out, "--hf-model", hf_dir, "--no-progress"]) == 0  # layout detected
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    _consolidated_matches(hf_dir, save_dir, trained, out)


def test_zero2_checkpoint_released_for_vllm(hf_dir, zero2, tmp_path) -> None:
    """``--for vllm`` on a DeepSpeed checkpoint: no patterns, the trained logits, max_lora_rank said."""
    save_dir, trained = zero2
    out = str(tmp_path / "vllm")
    assert cli_main(["consolidate", save_dir, out, "--hf-model", hf_dir, "--for", "vllm", "--no-progress"]) == 0
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    _consolidated_matches(hf_dir, save_dir, trained, out)
    dora = _copy(save_dir, tmp_path)
    path = dora / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_dora": True}))
    with pytest.raises(ConsolidationError, match="vLLM does not serve DoRA"):
        consolidate_deepspeed(dora, tmp_path / "dora", hf_model_dir=hf_dir, target="vllm", show_progress=False)
    assert not (tmp_path / "dora").exists()


@pytest.mark.parametrize("stage", [3, pytest.param(1, marks=pytest.mark.slow)])
def test_zero_checkpoint_consolidates_to_a_peft_adapter(hf_dir, stage, tmp_path) -> None:
    save_dir = str(tmp_path / "ckpt")
    trained = run_distributed(_train, 2, args=(hf_dir, stage, save_dir))[0]
    out = consolidate_deepspeed(save_dir, tmp_path / "adapter", hf_model_dir=hf_dir, show_progress=False)
    _consolidated_matches(hf_dir, save_dir, trained, str(out))


def test_peft_model_checkpoint_consolidates_too(hf_dir, tmp_path) -> None:
    """An engine around PEFT's PeftModel (names base_model.model.*, PEFT's adapter_config.json)."""
    save_dir = str(tmp_path / "ckpt")
    trained = run_distributed(_train, 2, args=(hf_dir, 2, save_dir, "peft"))[0]
    out = consolidate_deepspeed(save_dir, tmp_path / "adapter", hf_model_dir=hf_dir, show_progress=False)
    _consolidated_matches(hf_dir, save_dir, trained, str(out))


def _copy(save_dir: str, tmp_path: pathlib.Path) -> pathlib.Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(save_dir, copy)
    return copy


def _tag_dir(save_dir: pathlib.Path) -> pathlib.Path:
    return save_dir / (save_dir / "latest").read_text().strip()


def test_missing_rank_partition_is_named(zero2, tmp_path) -> None:
    ckpt = _copy(zero2[0], tmp_path)
    (_tag_dir(ckpt) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = tmp_path / "out"
    missing = r"zero_pp_rank_1_mp_rank_00_optim_states\.pt \(data-parallel rank 1 of 2\) is missing"
    with pytest.raises(ConsolidationError, match=missing):
        consolidate_deepspeed(ckpt, out, show_progress=False)
    assert not out.exists()


def test_corrupt_partition_is_a_clear_error(zero2, tmp_path) -> None:
    ckpt = _copy(zero2[0], tmp_path)
    path = _tag_dir(ckpt) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:2000])  # a truncated save
    out = tmp_path / "out"
    assert cli_main(["consolidate", str(ckpt), str(out), "--no-progress"]) == 2  # bad input: exit code 2, as argparse
    corrupt = "zero_pp_rank_0_mp_rank_00_optim_states.pt is not a readable.*corrupt or truncated"
    with pytest.raises(ConsolidationError, match=corrupt):
        consolidate_deepspeed(ckpt, out, show_progress=False)
    assert not out.exists()


class _Trap:
    """Unpickling this would create ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unsafe_pickle_is_refused_and_never_run(zero2, tmp_path) -> None:
    ckpt = _copy(zero2[0], tmp_path)
    model_file = _tag_dir(ckpt) / "mp_rank_00_model_states.pt"
    states = torch.load(model_file, weights_only=True)
    marker = tmp_path / "code_ran"
    states["client_state"] = _Trap(str(marker))
    torch.save(states, model_file)
    with pytest.raises(ConsolidationError, match="refuses to unpickle"):
        consolidate_deepspeed(ckpt, tmp_path / "out", show_progress=False)
    assert not marker.exists()


def test_checkpoint_without_adapter_tensors_names_what_it_found(hf_dir, tmp_path) -> None:
    save_dir = str(tmp_path / "ckpt")
    run_distributed(_train, 2, args=(hf_dir, 2, save_dir, "norm_only"))
    LoraConfig(**LORA).save_pretrained(save_dir)
    with pytest.raises(ConsolidationError, match=r"not LoRA adapter tensors, e\.g\. \['model\.norm\.weight'\]"):
        consolidate_deepspeed(save_dir, tmp_path / "out", show_progress=False)


def test_wrong_adapter_name_and_missing_config(zero2, tmp_path) -> None:
    ckpt = _copy(zero2[0], tmp_path)
    with pytest.raises(ConsolidationError, match=r"no tensors of adapter 'other'; it holds adapters \['default'\]"):
        consolidate_deepspeed(ckpt, tmp_path / "out", adapter="other", show_progress=False)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (ckpt / "adapter_config.json").rename(config_dir / "adapter_config.json")
    with pytest.raises(ConsolidationError, match="pass --config"):
        consolidate_deepspeed(ckpt, tmp_path / "out", show_progress=False)
    out = consolidate_deepspeed(ckpt, tmp_path / "out", config=config_dir, show_progress=False)
    assert LoraConfig.from_pretrained(out).r == LORA["r"]
    tag = _tag_dir(ckpt).name
    with pytest.raises(ConsolidationError, match="names checkpoint 'global_step999', but .* does not exist"):
        consolidate_deepspeed(ckpt, tmp_path / "out2", config=config_dir, tag="global_step999", show_progress=False)
    by_tag = consolidate_deepspeed(_tag_dir(ckpt), tmp_path / "out3", config=config_dir, show_progress=False)
    weights = "adapter_model.safetensors"
    assert (pathlib.Path(by_tag) / weights).read_bytes() == (pathlib.Path(out) / weights).read_bytes()
    assert tag.startswith("global_step")


@pytest.mark.parametrize(
    "file,field,value",
    [
        ("mp_rank_00_model_states.pt", "param_shapes", "a dict"),
        ("mp_rank_00_model_states.pt", "dp_world_size", "2"),
        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_stage", "2"),
    ],
)
def test_malformed_field_names_the_file(zero2, tmp_path, capsys, file, field, value) -> None:
    ckpt = _copy(zero2[0], tmp_path)
    path = _tag_dir(ckpt) / file
    states = torch.load(path, weights_only=False)  # the test's own file, with DeepSpeed's classes
    target = states["optimizer_state_dict"] if "optim" in file else states
    target[field] = {k: v for group in target[field] for k, v in group.items()} if value == "a dict" else value
    torch.save(states, path)
    out = tmp_path / "out"
    assert cli_main(["consolidate", str(ckpt), str(out), "--no-progress"]) == BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("dist-lora consolidate: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: " in err and f"{field} must be" in err, err
    assert not out.exists()


def test_latest_pointing_outside_the_checkpoint_is_refused(zero2, tmp_path) -> None:
    ckpt = _copy(zero2[0], tmp_path)
    shutil.copytree(_tag_dir(ckpt), tmp_path / "elsewhere")
    (ckpt / "latest").write_text("../elsewhere\n")
    with pytest.raises(ConsolidationError, match=r"latest names '\.\./elsewhere', which is not a tag directory"):
        consolidate_deepspeed(ckpt, tmp_path / "out", show_progress=False)


def test_bad_rank_pattern_names_the_config_file(zero2, tmp_path) -> None:
    ckpt = _copy(zero2[0], tmp_path)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj(": 2}
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    message = rf"{ckpt}/adapter_config\.json: rank_pattern key 'q_proj\(' is not a valid regular expression"
    with pytest.raises(ConsolidationError, match=message):
        consolidate_deepspeed(ckpt, tmp_path / "out", show_progress=False)


def test_nonfinite_adapter_is_not_released(zero2, tmp_path) -> None:
    ckpt = _copy(zero2[0], tmp_path)
    optim_path = _tag_dir(ckpt) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    model_path = _tag_dir(ckpt) / "mp_rank_00_model_states.pt"
    optim, model = torch.load(optim_path, weights_only=False), torch.load(model_path, weights_only=False)
    first = next(iter(model["param_shapes"][0]))  # its element 0 is element 0 of rank 0's partition
    with torch.no_grad():
        optim["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][0] = float("inf")
        model["module"][first].view(-1)[0] = float("inf")  # the saved weight agrees with its master
    torch.save(optim, optim_path)
    torch.save(model, model_path)
    with pytest.raises(ConsolidationError, match=r"lora_\S+ in .* has 1 NaN/Inf values.*--allow-nonfinite"):
        consolidate_deepspeed(ckpt, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_base_rewriting_init_is_refused(zero2, tmp_path) -> None:
    """The DeepSpeed source goes through the same release checks as a sharded checkpoint."""
    ckpt = _copy(zero2[0], tmp_path)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConsolidationError, match=r"init_lora_weights='pissa' changes the base weights"):
        consolidate_deepspeed(ckpt, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
