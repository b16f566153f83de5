"""The manifest of a sharded checkpoint: its schema, and the one reader that checks it.

``manifest.json`` is written last (see :mod:`.sharded`); a checkpoint without it is incomplete.
Format ``dist_lora.sharded/2``::

    {"format": "dist_lora.sharded/2", "adapter_name": "default",
     "layout": {"tp": 2, "pp": 1, "world": 2},                   (MoE: also "ep", "etp")
     "files":  {"shard-pp000-tp000.safetensors": {"sha256": "<hex>", "tensors": {<file key>: <entry>}}},
               (MoE experts: "shard-pp000-tp000-ep001.safetensors", tp = the expert-TP rank)
     "config": {"adapter_config.json": {"sha256": "<hex>"}},
     "rng":    {"rng-rank00000.pt": {"sha256": "<hex>"}},            (with trainer_state)
     "optimizer": {"files": {...as "files"...}, "scalars": {...}, "param_groups": [...]},  (optional)
     "trainer_state": {...}}                                         (optional)

    <entry> = {"key": global tensor key, "global_shape": [..], "offsets": [..], "shape": [..],
               "dtype": "float32"}: the piece [offsets, offsets + shape) of the global tensor

Every file the checkpoint is made of is listed with its sha256, so a file changed after
saving (a hand-edited ``lora_alpha`` in ``adapter_config.json`` included) is refused. Every
name is a plain file name inside the checkpoint directory (:func:`dist_lora.io.is_plain_file_name`).

Format ``dist_lora.sharded/1`` (before adapter_config.json and the RNG files had checksums)
is still read: its shards are verified as before and a warning says that the config and RNG
files are not; re-save the checkpoint (load it and save it again) to cover them.

The shard format has two homes, one per side: this module (what is on disk: the schema, the
file names, the checksums, reading the manifest) and :mod:`.pieces` (the tensors: where a TP
shard sits in its global tensor, the pieces of each tensor, assembling any box of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from typing import Any, Iterable, NamedTuple, Optional

import torch

from ..config import CONFIG_NAME, ConfigError, DistLoraWarning, LoraConfig
from ..io import is_plain_file_name

MANIFEST = "manifest.json"
FORMAT = "dist_lora.sharded/2"
LEGACY_FORMATS = ("dist_lora.sharded/1",)
# Parts of a checkpoint a reader may need. "adapter" (shards + adapter_config.json) is always read.
PARTS = ("adapter", "optimizer", "rng")
_SHARD_NAME = re.compile(r"(shard|optim)-pp(\d+)-tp(\d+)(?:-ep(\d+))?\.safetensors")
_RNG_NAME = re.compile(r"rng-rank\d{5}\.pt")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "the manifest is corrupt or was edited: restore the checkpoint from a copy, or re-save it"


# ---------------------------------------------------------------------------------------------
# File names and checksums


def shard_file_name(kind: str, pp: int, tp: int, ep: Optional[int] = None) -> str:
    """``shard-pp000-tp001.safetensors`` (kind "shard": adapter) or ``optim-...`` (optimizer);
    MoE expert adapters of expert-parallel rank ``ep`` go to ``shard-pp000-tp001-ep002.safetensors``
    (``tp``: the expert-TP rank), so dense and expert pieces never share a writer."""
    suffix = "" if ep is None else f"-ep{ep:03d}"
    return f"{kind}-pp{pp:03d}-tp{tp:03d}{suffix}.safetensors"


class ShardName(NamedTuple):
    kind: str  # "shard" (adapter) or "optim"
    pp: int
    tp: int  # the expert-TP rank in an expert file
    ep: Optional[int] = None  # expert files only

    def describe(self) -> str:
        """``PP stage 0, TP rank 1`` (expert files: ``..., expert-TP rank 1, EP rank 2``)."""
        if self.ep is None:
            return f"PP stage {self.pp}, TP rank {self.tp}"
        return f"PP stage {self.pp}, expert-TP rank {self.tp}, EP rank {self.ep}"


def parse_shard_name(name: str) -> Optional[ShardName]:
    """The kind, PP stage, TP rank (and EP rank) of a :func:`shard_file_name`; None for other names."""
    m = _SHARD_NAME.fullmatch(name)
    return ShardName(m[1], int(m[2]), int(m[3]), None if m[4] is None else int(m[4])) if m else None


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Schema


def _problem(path: str, field: str, what: str, value: Any) -> ConfigError:
    got = type(value).__name__ if isinstance(value, (dict, list)) else repr(value)
    return ConfigError(f"{path}: {field} must be {what}, got {got}; {_FIX}.")


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _need(ok: bool, path: str, field: str, what: str, value: Any) -> None:
    if not ok:
        raise _problem(path, field, what, value)


def _check_name(path: str, field: str, name: Any) -> None:
    if not is_plain_file_name(name):
        raise ConfigError(
            f"{path}: {field} names the file {name!r}, which is not a plain file name inside the checkpoint "
            f"directory (no directories, no '..', no absolute paths); {_FIX}."
        )


def _check_sums(path: str, field: str, files: Any, name_rule: Optional[re.Pattern] = None) -> None:
    """``{file name: {"sha256": hex, ...}}``."""
    _need(isinstance(files, dict), path, field, "an object (file name -> record)", files)
    for name, info in files.items():
        _check_name(path, field, name)
        if name_rule is not None and not name_rule.fullmatch(name):
            raise _problem(path, f"{field} key", f"a name like {name_rule.pattern}", name)
        where = f"{field}[{name!r}]"
        _need(isinstance(info, dict), path, where, "an object", info)
        sha = info.get("sha256")
        _need(isinstance(sha, str) and bool(_SHA256.fullmatch(sha)), path, f"{where}.sha256", "a hex sha256", sha)


def _check_entry(path: str, where: str, entry: Any) -> None:
    _need(isinstance(entry, dict), path, where, "an object (key, global_shape, offsets, shape, dtype)", entry)
    _need(isinstance(entry.get("key"), str) and bool(entry.get("key")), path, f"{where}.key", "a tensor name",
          entry.get("key"))
    dims = {}
    for field in ("global_shape", "offsets", "shape"):
        value = entry.get(field)
        ok = isinstance(value, list) and all(_is_count(v) for v in value)
        _need(ok, path, f"{where}.{field}", "a list of non-negative integers", value)
        dims[field] = value
    if not len(dims["global_shape"]) == len(dims["offsets"]) == len(dims["shape"]) or any(
        o + s > g for o, s, g in zip(dims["offsets"], dims["shape"], dims["global_shape"])
    ):
        raise ConfigError(
            f"{path}: {where}: piece {dims['offsets']}+{dims['shape']} lies outside the global shape "
            f"{dims['global_shape']}; {_FIX}."
        )
    dtype = entry.get("dtype")
    ok = isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)
    _need(ok, path, f"{where}.dtype", "a torch dtype name such as 'float32'", dtype)


def _check_shards(path: str, field: str, files: Any) -> None:
    _check_sums(path, field, files)
    for name, info in files.items():
        tensors = info.get("tensors")
        where = f"{field}[{name!r}].tensors"
        _need(isinstance(tensors, dict), path, where, "an object (file key -> entry)", tensors)
        for file_key, entry in tensors.items():
            _check_entry(path, f"{where}[{file_key!r}]", entry)


def check_schema(manifest: Any, path: str) -> None:
    """Raise a ConfigError naming ``path`` and the field unless ``manifest`` follows the schema
    in the module docstring (all file names plain names)."""
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, *LEGACY_FORMATS):
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{path} is not a {FORMAT!r} manifest (format {got!r}).")
    _need(isinstance(manifest.get("adapter_name"), str), path, "adapter_name", "a string", manifest.get("adapter_name"))
    layout = manifest.get("layout")
    _need(isinstance(layout, dict), path, "layout", "an object (tp, pp, world)", layout)
    for key in ("tp", "pp", "world"):
        _need(_is_count(layout.get(key), 1), path, f"layout.{key}", "an integer >= 1", layout.get(key))
    for key in ("ep", "etp"):  # MoE checkpoints
        if key in layout:
            _need(_is_count(layout.get(key), 1), path, f"layout.{key}", "an integer >= 1", layout.get(key))
    _check_shards(path, "files", manifest.get("files"))
    if "optimizer" in manifest:
        section = manifest["optimizer"]
        _need(isinstance(section, dict), path, "optimizer", "an object", section)
        _check_shards(path, "optimizer.files", section.get("files"))
        _need(isinstance(section.get("scalars"), dict), path, "optimizer.scalars", "an object", section.get("scalars"))
        groups = section.get("param_groups")
        ok = isinstance(groups, list) and all(isinstance(g, dict) for g in groups)
        _need(ok, path, "optimizer.param_groups", "a list of objects", groups)
    if "trainer_state" in manifest:
        state = manifest["trainer_state"]
        _need(isinstance(state, dict), path, "trainer_state", "an object", state)
    if manifest["format"] in LEGACY_FORMATS:
        return
    _check_sums(path, "config", manifest.get("config"))
    _need(set(manifest["config"]) == {CONFIG_NAME}, path, "config", f"{{{CONFIG_NAME!r}: ...}}", manifest["config"])
    if "rng" in manifest:
        _check_sums(path, "rng", manifest["rng"], _RNG_NAME)


# ---------------------------------------------------------------------------------------------
# Reading


def manifest_files(manifest: dict, parts: Iterable[str] = PARTS) -> dict[str, dict]:
    """File name -> its manifest record (``sha256``, and ``tensors`` for shards), for the files
    of ``parts`` ("adapter": shards + adapter_config.json; "optimizer"; "rng")."""
    parts = set(parts)
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown checkpoint parts {sorted(unknown)}; known: {list(PARTS)}.")
    files = {**manifest["files"], **manifest.get("config", {})}
    if "optimizer" in parts:
        files.update(manifest.get("optimizer", {}).get("files", {}))
    if "rng" in parts:
        files.update(manifest.get("rng", {}))
    return files


def _load_json(directory: str, path: str) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(
            f"{directory} has no {MANIFEST}: the checkpoint is incomplete (still being written, or its save failed) "
            "or is not a dist_lora sharded checkpoint."
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): the checkpoint is corrupt.") from None


def _missing(directory: str, name: str, info: dict) -> ConfigError:
    shard = parse_shard_name(name)
    where = f" ({shard.describe()})" if shard else ""
    keys = sorted({entry["key"] for entry in info.get("tensors", {}).values()})
    holds = f"; it holds {len(keys)} tensors, e.g. {', '.join(keys[:3])}" if keys else ""
    return ConfigError(
        f"checkpoint {directory} is incomplete: {name}{where} is missing{holds}. Copy the missing {name} from "
        "the node that wrote it, or use an earlier complete checkpoint."
    )


def check_file(directory: str, name: str, info: dict, verify: bool = True) -> str:
    """The path of manifest file ``name``; raises if it is missing or (``verify``) its sha256
    differs from the manifest's."""
    file_path = os.path.join(directory, name)
    if not os.path.isfile(file_path):
        raise _missing(directory, name, info)
    if verify and sha256_file(file_path) != info["sha256"]:
        raise ConfigError(f"checksum mismatch for {file_path}: the file is corrupt or was changed after saving.")
    return file_path


def read_manifest(directory: str | os.PathLike, verify: bool = True, parts: Iterable[str] = PARTS) -> dict:
    """The manifest of a complete checkpoint, checked: its schema (every field, plain file names),
    and for the files of ``parts`` (see :func:`manifest_files`) that each is present and, with
    ``verify``, has the sha256 the manifest records. Raises a ConfigError naming the file."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    manifest = _load_json(directory, path)
    check_schema(manifest, path)
    if verify and manifest["format"] in LEGACY_FORMATS:
        warnings.warn(
            f"{path} has format {manifest['format']!r} (written by an older dist_lora): its {CONFIG_NAME} and RNG "
            "files are not covered by checksums, so a change to them cannot be detected; load and re-save the "
            "checkpoint to cover them.",
            DistLoraWarning,
            stacklevel=2,
        )
    for name, info in manifest_files(manifest, parts).items():
        check_file(directory, name, info, verify)
    return manifest


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """``adapter_config.json`` of ``directory`` as a LoraConfig; any problem with it is a
    ConfigError that names the file."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    try:
        config = LoraConfig.from_pretrained(directory)
    except (ValueError, TypeError) as e:  # ConfigError included; TypeError: a field of the wrong type
        message = str(e)
        raise ConfigError(message if path in message else f"{path}: {message}") from None
    for field in ("rank_pattern", "alpha_pattern"):  # keys are regexes (PEFT's rule): compile them now
        for key in getattr(config, field):
            try:
                re.compile(key)
            except (re.error, TypeError) as e:
                raise ConfigError(
                    f"{path}: {field} key {key!r} is not a valid regular expression ({e}); fix or remove it."
                ) from None
    return config

