"""Faults in sharded checkpoints and releases (issue #14, items 3-5 and the clear-error list):
a changed adapter_config.json or RNG file is caught by the manifest's checksums; manifest file
names that leave the checkpoint are refused; NaN/Inf adapters are not released unless asked;
a malformed manifest, adapter config, RNG file or base model ends in one error line that names
the file and the field, with OUT_DIR untouched; a training run's checkpoint root is accepted.

The checkpoint is a real one: dist_lora LoRA on a tiny HF Llama, one AdamW step, saved with
``save_sharded`` (optimizer and trainer state: every kind of file) in this process."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dist_lora import ConfigError, LoraConfig, get_lora_model
from dist_lora.release.consolidate import consolidate
from dist_lora.release.errors import ConsolidationError
from dist_lora.checkpoint.manifest import LEGACY_FORMATS
from dist_lora.checkpoint.sharded import load_sharded, read_manifest, restore_rng_states, save_sharded, sha256_file
from dist_lora.checkpoint.training import load_checkpoint, save_checkpoint
from dist_lora.cli import BAD_INPUT
from dist_lora.cli import main as cli_main
from tests.hf_models import load_base, sample_ids, save_base, tiny_llama

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
CONFIG, MANIFEST, RNG = "adapter_config.json", "manifest.json", "rng-rank00000.pt"
SHARD = "shard-pp000-tp000.safetensors"


def _model(hf_dir: str):
    return get_lora_model(load_base(hf_dir), LoraConfig(**LORA), seed=0)


def _step(model) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_base(tiny_llama(seed=3), tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory) -> str:
    model = _model(base)
    directory = str(tmp_path_factory.mktemp("run") / "ckpt")
    save_sharded(model, directory, optimizer=_step(model), trainer_state={"step": 1})
    return directory


@pytest.fixture
def ckpt(saved, tmp_path) -> str:
    """A copy of the checkpoint to break."""
    return shutil.copytree(saved, str(tmp_path / "ckpt"))


def _manifest(ckpt: str) -> dict:
    with open(os.path.join(ckpt, MANIFEST)) as f:
        return json.load(f)


def _write_manifest(ckpt: str, manifest: dict) -> None:
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(manifest, f)


def _rehash(ckpt: str, section: str, name: str) -> None:
    """Record the current sha256 of ``name`` (as if the checkpoint had been saved that way)."""
    manifest = _manifest(ckpt)
    manifest[section][name]["sha256"] = sha256_file(os.path.join(ckpt, name))
    _write_manifest(ckpt, manifest)


def _edit_config(ckpt: str, **changes) -> None:
    path = os.path.join(ckpt, CONFIG)
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def _cli_fails(capsys, argv: list[str], *needles: str) -> str:
    """The command exits with the error code, one stderr line naming ``needles``, no traceback,
    and writes no OUT_DIR (argv[2])."""
    capsys.readouterr()
    assert cli_main([*argv, "--no-progress"]) == BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"dist-lora {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not os.path.exists(argv[2])
    return err


# ---------------------------------------------------------------------------------------------
# Item 3: adapter_config.json and the RNG files are covered by the checksums


def test_manifest_records_every_file(saved) -> None:
    manifest = read_manifest(saved)
    sections = (manifest["files"], manifest["optimizer"]["files"], manifest["config"], manifest["rng"])
    listed = {name for section in sections for name in section}
    assert listed == set(os.listdir(saved)) - {MANIFEST}
    assert manifest["config"][CONFIG]["sha256"] == sha256_file(os.path.join(saved, CONFIG))


def test_edited_config_is_not_released(ckpt, tmp_path, capsys) -> None:
    _edit_config(ckpt, lora_alpha=800)
    out = str(tmp_path / "out")
    _cli_fails(capsys, ["consolidate", ckpt, out], "checksum mismatch", CONFIG)
    with pytest.raises(ConfigError, match=f"checksum mismatch for .*{CONFIG}"):
        load_sharded(_model_without_adapter(ckpt), ckpt)


def _model_without_adapter(ckpt: str):
    """A LoraModel whose 'default' adapter differs from the checkpoint's name, so the load
    creates the adapter from the checkpoint's config."""
    manifest = _manifest(ckpt)
    manifest["adapter_name"] = "released"
    _write_manifest(ckpt, manifest)
    return get_lora_model(tiny_llama(seed=3), LoraConfig(**LORA), seed=0)


def test_changed_rng_file_is_refused(ckpt, base) -> None:
    generator = torch.Generator().manual_seed(99)
    torch.save({"torch": generator.get_state()}, os.path.join(ckpt, RNG))  # valid, but not the saved one
    with pytest.raises(ConfigError, match=f"checksum mismatch for .*{RNG}"):
        restore_rng_states(ckpt)


# ---------------------------------------------------------------------------------------------
# Item 4: manifest file names stay inside the checkpoint


@pytest.mark.parametrize("how", ["absolute", "parent"])
def test_manifest_names_outside_the_checkpoint_are_refused(ckpt, base, tmp_path, capsys, how) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(os.path.join(ckpt, SHARD), outside)
    name = str(outside) if how == "absolute" else "../outside.safetensors"
    manifest = _manifest(ckpt)
    manifest["files"] = {name: manifest["files"].pop(SHARD)}
    _write_manifest(ckpt, manifest)
    os.remove(os.path.join(ckpt, SHARD))
    message = "not a plain file name inside the checkpoint directory"
    _cli_fails(capsys, ["consolidate", ckpt, str(tmp_path / "out")], MANIFEST, repr(name), message)
    _cli_fails(capsys, ["merge", ckpt, str(tmp_path / "merged"), "--hf-model", base], repr(name), message)
    model = _model(base)
    with pytest.raises(ConfigError, match=message):
        load_checkpoint(ckpt, model, _step(model))


def test_rng_name_outside_the_checkpoint_is_refused(ckpt) -> None:
    manifest = _manifest(ckpt)
    manifest["rng"] = {"/etc/rng-rank00000.pt": manifest["rng"][RNG]}
    _write_manifest(ckpt, manifest)
    with pytest.raises(ConfigError, match="rng names the file '/etc/rng-rank00000.pt'"):
        read_manifest(ckpt, verify=False)


# ---------------------------------------------------------------------------------------------
# Item 5 (release side): NaN/Inf adapters are refused unless --allow-nonfinite


def test_nonfinite_adapter_is_not_released(base, tmp_path, capsys) -> None:
    model = _model(base)
    key = "model.layers.1.self_attn.v_proj.lora_B.weight"
    with torch.no_grad():
        model.model.get_submodule("model.layers.1.self_attn.v_proj").lora_B["default"].weight[0, 0] = float("nan")
    ckpt = str(tmp_path / "ckpt")
    save_sharded(model, ckpt)
    out, merged = str(tmp_path / "out"), str(tmp_path / "merged")
    _cli_fails(capsys, ["consolidate", ckpt, out], key, "NaN/Inf", "--allow-nonfinite")
    _cli_fails(capsys, ["merge", ckpt, merged, "--hf-model", base], key, "--allow-nonfinite")
    assert cli_main(["consolidate", ckpt, out, "--no-progress", "--allow-nonfinite"]) == 0
    assert cli_main(["merge", ckpt, merged, "--hf-model", base, "--no-progress", "--allow-nonfinite"]) == 0


# ---------------------------------------------------------------------------------------------
# Clear errors: one schema check for the manifest, shared by consolidate and load_sharded


def _tensors(manifest: dict) -> dict:
    return manifest["files"][SHARD]["tensors"]


def _first(manifest: dict) -> dict:
    return next(iter(_tensors(manifest).values()))


@pytest.mark.parametrize(
    "breaks,field",
    [
        (lambda m: m["files"][SHARD].update(tensors=list(_tensors(m).values())), f"files['{SHARD}'].tensors must be"),
        (lambda m: _tensors(m).update({k: "a string" for k in _tensors(m)}), f"files['{SHARD}'].tensors['"),
        (lambda m: _first(m).update(global_shape=str(_first(m)["global_shape"])), ".global_shape must be a list"),
        (lambda m: _first(m).update(offsets=[5, 0]), "lies outside the global shape"),
        (lambda m: _first(m).update(dtype="float99"), ".dtype must be a torch dtype name"),
        (lambda m: m["layout"].update(world="2"), "layout.world must be an integer"),
        (lambda m: m.pop("config"), "config must be an object"),
        (lambda m: m["optimizer"].update(files=[]), "optimizer.files must be an object"),
    ],
    ids=["tensors_list", "entry_string", "global_shape_string", "piece_outside", "dtype", "world_text",
         "no_config_checksum", "optimizer_files_list"],
)
def test_malformed_manifest_names_the_field(ckpt, base, tmp_path, capsys, breaks, field) -> None:
    manifest = _manifest(ckpt)
    breaks(manifest)
    _write_manifest(ckpt, manifest)
    _cli_fails(capsys, ["consolidate", ckpt, str(tmp_path / "out")], os.path.join(ckpt, MANIFEST), field)
    model = _model(base)
    with pytest.raises(ConfigError, match="manifest.json: ") as error:
        load_checkpoint(ckpt, model, _step(model))
    assert field in str(error.value)


@pytest.mark.parametrize(
    "changes,needles",
    [
        ({"rank_pattern": ["q_proj"]}, ()),
        ({"rank_pattern": 5}, ()),
        ({"rank_pattern": {"q_proj(": 2}}, ("rank_pattern", "'q_proj('", "not a valid regular expression")),
        ({"alpha_pattern": {"[v_proj": 4}}, ("alpha_pattern", "'[v_proj'")),
    ],
    ids=["rank_pattern_list", "rank_pattern_number", "rank_pattern_regex", "alpha_pattern_regex"],
)
def test_bad_adapter_config_names_the_file(ckpt, tmp_path, capsys, changes, needles) -> None:
    _edit_config(ckpt, **changes)
    _rehash(ckpt, "config", CONFIG)  # saved that way: only the content is wrong
    path = os.path.join(ckpt, CONFIG)
    _cli_fails(capsys, ["consolidate", ckpt, str(tmp_path / "out")], path, *needles)
    with pytest.raises(ConfigError, match=f"{path}: ") as error:
        load_sharded(_model_without_adapter(ckpt), ckpt)
    assert all(needle in str(error.value) for needle in needles)


@pytest.mark.parametrize("content", [b"not a torch file", b"PK\x03\x04 truncated zip"])
def test_rng_file_that_is_not_a_tensor_file(ckpt, base, content) -> None:
    with open(os.path.join(ckpt, RNG), "wb") as f:
        f.write(content)
    _rehash(ckpt, "rng", RNG)
    with pytest.raises(ConfigError, match=f"{RNG} is not a readable RNG state file.*restore it"):
        restore_rng_states(ckpt)
    model = _model(base)
    optimizer = _step(model)
    _step(model)  # now unlike the checkpoint
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=RNG):
        load_checkpoint(ckpt, model, optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before loading


def test_rng_file_with_other_content(ckpt) -> None:
    torch.save({"torch": torch.zeros(3)}, os.path.join(ckpt, RNG))
    _rehash(ckpt, "rng", RNG)
    with pytest.raises(ConfigError, match=f"{RNG} does not hold RNG states"):
        restore_rng_states(ckpt)


def test_merge_on_a_truncated_base_model_names_the_file(saved, base, tmp_path, capsys) -> None:
    broken = shutil.copytree(base, str(tmp_path / "hf"))
    path = os.path.join(broken, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    _cli_fails(capsys, ["merge", saved, str(tmp_path / "merged"), "--hf-model", broken], path, "truncated")


# ---------------------------------------------------------------------------------------------
# A training run's checkpoint root; checkpoints written before the config had a checksum


def test_consolidate_accepts_a_training_run_root(base, tmp_path, capsys) -> None:
    root = str(tmp_path / "checkpoints")
    model = _model(base)
    optimizer = _step(model)
    save_checkpoint(root, 1, model, optimizer)
    step_dir = save_checkpoint(root, 2, model, optimizer)
    out = str(tmp_path / "out")
    assert cli_main(["consolidate", root, out, "--no-progress"]) == 0
    assert f"using its latest checkpoint {step_dir}" in capsys.readouterr().err
    reference = consolidate(step_dir, tmp_path / "reference", show_progress=False)
    for name in (CONFIG, "adapter_model.safetensors"):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), name
    merged = str(tmp_path / "merged")
    assert cli_main(["merge", root, merged, "--hf-model", base, "--no-progress"]) == 0


def test_checkpoint_of_the_previous_format_is_read_with_a_warning(ckpt, base, tmp_path) -> None:
    manifest = _manifest(ckpt)
    manifest["format"] = LEGACY_FORMATS[0]
    del manifest["config"], manifest["rng"]
    _write_manifest(ckpt, manifest)
    with pytest.warns(UserWarning, match="not covered by checksums"):
        consolidate(ckpt, tmp_path / "out", show_progress=False)
    model = _model(base)
    with pytest.warns(UserWarning, match="load and re-save"):
        assert load_checkpoint(ckpt, model, _step(model))["rng_restored"]


def test_errors_leave_no_half_release(ckpt, tmp_path) -> None:
    """The error comes before OUT_DIR changes: a previous release there stays as it was."""
    out = tmp_path / "out"
    consolidate(ckpt, out, show_progress=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    _edit_config(ckpt, lora_alpha=800)
    with pytest.raises(ConsolidationError, match="checksum mismatch"):
        consolidate(ckpt, out, overwrite=True, show_progress=False)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
