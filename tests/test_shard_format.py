"""The shard format on its own (one process): pieces written at one TP size are assembled into
any box of the global tensor (a rank's slice at another TP size, or the whole tensor), an
incomplete or inconsistent set of pieces is refused naming what is wrong; and the atomic
directory helper every checkpoint and release is written with."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dist_lora.checkpoint.manifest import shard_file_name
from dist_lora.checkpoint.pieces import (
    Scratch,
    ShardFiles,
    assemble,
    check_coverage,
    index_tensors,
    shard_pieces,
    tp_boxes,
)
from dist_lora.config import ConfigError
from dist_lora.io import AtomicDirectory, DirectoryNotEmptyError, paths_overlap
from dist_lora.parallel.tp import set_tp_attributes, shard

FULL = torch.arange(8 * 8, dtype=torch.float32).reshape(8, 8)


def _local(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    if size == 1:
        return torch.nn.Parameter(full.clone())
    param = torch.nn.Parameter(shard(full, dim, rank, size, stride))
    set_tp_attributes(param, dim, stride)
    return param


def _save(directory: str, key: str, full: torch.Tensor, dim: int, stride: int, tp: int) -> dict:
    """Every TP rank's shard file, as save_sharded writes them; the manifest's ``files``."""
    files = {}
    for rank in range(tp):
        param = _local(full, dim, stride, rank, tp)
        pieces = shard_pieces(key, param, param, rank, tp)
        name = shard_file_name("shard", 0, rank)
        save_file({file_key: t for file_key, t, _ in pieces}, os.path.join(directory, name))
        files[name] = {"tensors": {file_key: entry for file_key, _, entry in pieces}}
    return files


@pytest.mark.parametrize("dim,stride", [(0, 1), (0, 2), (1, 1)], ids=["rows", "strided_rows", "columns"])
@pytest.mark.parametrize("saved_tp", [1, 2])
def test_pieces_assemble_into_any_box(tmp_path, dim: int, stride: int, saved_tp: int) -> None:
    files = _save(str(tmp_path), "w", FULL, dim, stride, saved_tp)
    tensors = index_tensors(tmp_path, files)
    check_coverage(tensors["w"], saved_tp)
    with ShardFiles(tmp_path) as shard_files:
        scratch = Scratch()
        whole = assemble(tensors["w"], shard_files, torch.empty(8, 8), scratch=scratch)
        assert torch.equal(whole, FULL)
        box = assemble(tensors["w"], shard_files, torch.empty(5, 3), [1, 2], scratch)
        assert torch.equal(box, FULL[1:6, 2:5])
        for tp in (1, 2, 4):  # each rank's slice at another TP size, as load_sharded cuts it
            for rank in range(tp):
                want = _local(FULL, dim, stride, rank, tp)
                global_shape, boxes = tp_boxes(want, rank, tp)
                assert global_shape == list(FULL.shape)
                got = torch.empty_like(want)
                for index, offsets, _ in boxes:
                    assemble(tensors["w"], shard_files, got[index], offsets, scratch)
                assert torch.equal(got, want), (tp, rank)


def test_a_scalar_round_trips(tmp_path) -> None:
    files = _save(str(tmp_path), "s", torch.tensor(3.5), 0, 1, 1)
    tensors = index_tensors(tmp_path, files)
    check_coverage(tensors["s"], 1)
    with ShardFiles(tmp_path) as shard_files:
        assert assemble(tensors["s"], shard_files, torch.empty(())).item() == 3.5


def test_missing_pieces_name_the_shard_file(tmp_path) -> None:
    files = _save(str(tmp_path), "w", FULL, 0, 1, 2)
    del files[shard_file_name("shard", 0, 1)]
    tensors = index_tensors(tmp_path, files)
    with pytest.raises(ConfigError, match=r"tensor w is incomplete: its pieces cover 32 of 64 values; no piece from "
                                          r"shard-pp000-tp001\.safetensors \(PP stage 0, TP rank 1\)"):
        check_coverage(tensors["w"], 2)


def test_overlapping_pieces_are_refused(tmp_path) -> None:
    files = _save(str(tmp_path), "w", FULL, 0, 1, 2)
    entry = next(iter(files[shard_file_name("shard", 0, 1)]["tensors"].values()))
    entry["offsets"] = [2, 0]
    with pytest.raises(ConfigError, match="w: two pieces of it overlap"):
        check_coverage(index_tensors(tmp_path, files)["w"], 2)


def test_entry_that_disagrees_with_the_file_is_refused(tmp_path) -> None:
    files = _save(str(tmp_path), "w", FULL, 0, 1, 1)
    next(iter(files[shard_file_name("shard", 0, 0)]["tensors"].values()))["dtype"] = "float16"
    with pytest.raises(ConfigError, match=r"shard-pp000-tp000\.safetensors:w: the manifest says float16"):
        index_tensors(tmp_path, files)


def test_a_corrupt_shard_file_is_a_config_error(tmp_path) -> None:
    files = _save(str(tmp_path), "w", FULL, 0, 1, 1)
    path = tmp_path / shard_file_name("shard", 0, 0)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ConfigError, match=f"{path} is not a valid safetensors file"):
        index_tensors(tmp_path, files)


# ---------------------------------------------------------------------------------------------
# AtomicDirectory


def _leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".partial" in n or ".old-" in n]


def test_atomic_directory_replaces_only_when_complete(tmp_path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with AtomicDirectory(target) as staging:
            (open(os.path.join(staging, "new.txt"), "w")).write("half")
            raise RuntimeError("failed half way")
    assert os.listdir(target) == ["old.txt"] and not _leftovers(tmp_path)
    with AtomicDirectory(target) as staging:
        json.dump({"ok": True}, open(os.path.join(staging, "new.txt"), "w"))
    assert os.listdir(target) == ["new.txt"] and not _leftovers(tmp_path)


def test_atomic_directory_does_not_replace_what_appeared_without_overwrite(tmp_path) -> None:
    target = tmp_path / "out"
    with pytest.raises(DirectoryNotEmptyError, match="became non-empty"):
        with AtomicDirectory(target, overwrite=False) as staging:
            open(os.path.join(staging, "new.txt"), "w").close()
            target.mkdir()
            (target / "theirs.txt").write_text("x")
    assert os.listdir(target) == ["theirs.txt"] and not _leftovers(tmp_path)


def test_atomic_directory_with_a_fixed_staging_name(tmp_path) -> None:
    """Shared by several processes: the staging name is known to all; a crashed attempt's
    leftover is emptied first."""
    stale = tmp_path / "ckpt.partial"
    stale.mkdir()
    (stale / "half").write_text("x")
    target = AtomicDirectory(tmp_path / "ckpt", staging_name="ckpt.partial")
    assert target.staging == str(stale)
    assert target.create() == str(stale) and os.listdir(stale) == []
    (stale / "done").write_text("x")
    target.commit()
    assert os.listdir(tmp_path / "ckpt") == ["done"] and not _leftovers(tmp_path)


def test_paths_overlap(tmp_path) -> None:
    a = tmp_path / "a"
    assert paths_overlap(a, a) and paths_overlap(a, a / "b") and paths_overlap(a / "b", a)
    assert not paths_overlap(a, tmp_path / "ab")
