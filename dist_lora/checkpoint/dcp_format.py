"""The DCP checkpoint format of FSDP2 runs: what is on disk and the one safe reader.

A step directory (same ``step_N`` / ``latest`` / ``keep_last`` rules as :mod:`.training`)::

    .metadata, __<rank>_0.distcp   torch.distributed.checkpoint (DCP) files: every rank writes its
                                   own shards of {"model": adapter tensors, "optim": optimizer state}
    adapter_config.json            the LoraConfig of the adapter
    manifest.json                  written last (complete = has it), format "dist_lora.dcp/1":
        {"format", "adapter_name", "world": N, "base_model": {class, model_type, sizes...},
         "tensors": {DCP key: global shape}, "trainer_state": {"step": ...},
         "files": {name: {"sha256": hex}}}

Keys are the LoraModel's parameter names (``model.<hf module>.lora_A.<adapter>.weight``): DCP
reshards on load, so a checkpoint saved at one world size loads at any other.

Reading never unpickles arbitrary objects: DCP's ``.metadata`` is a pickle, read here by an
unpickler that allows only DCP's metadata classes, torch dtypes/sizes and paths
(:class:`SafeFileSystemReader`); non-tensor values (optimizer hyper-parameters) are read by
DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import torch

from ..config import ConfigError
from ..io import is_plain_file_name
from .manifest import MANIFEST, sha256_file

FORMAT = "dist_lora.dcp/1"
METADATA = ".metadata"
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which is not a DCP metadata class")


def read_metadata(directory: str | os.PathLike):
    """DCP's ``Metadata`` of the checkpoint in ``directory``, read safely."""
    path = os.path.join(os.fspath(directory), METADATA)
    if not os.path.isfile(path):
        raise ConfigError(f"{directory} has no {METADATA}: not a DCP checkpoint, or an incomplete one.")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ConfigError(f"{path} is not readable DCP metadata ({e}); restore the checkpoint from a copy.") from None


def safe_reader(directory: str | os.PathLike):
    """A DCP ``FileSystemReader`` for ``directory`` whose metadata is read by :func:`read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(self.path)
            metadata.storage_meta = getattr(metadata, "storage_meta", None)
            return metadata

    return SafeFileSystemReader(os.fspath(directory))


def write_manifest(directory: str, manifest: dict) -> None:
    """Write ``manifest.json`` (last: it marks the checkpoint complete), with the sha256 of every
    other file of ``directory``."""
    files = {name: {"sha256": sha256_file(os.path.join(directory, name))}
             for name in sorted(os.listdir(directory)) if name != MANIFEST}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, **manifest, "files": files}, f, indent=1)


def is_dcp_checkpoint(directory: str | os.PathLike) -> bool:
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_dcp_manifest(directory: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of a DCP checkpoint, every listed file present (and, with ``verify``, its
    sha256 matching)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the manifest ({e}); the checkpoint is incomplete or corrupt.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a {FORMAT} checkpoint (format {manifest.get('format')!r}).")
    for key in ("adapter_name", "tensors", "files", "base_model"):
        if key not in manifest:
            raise ConfigError(f"{path}: field {key!r} is missing; the manifest is corrupt or was edited.")
    for name, info in manifest["files"].items():
        if not is_plain_file_name(name):
            raise ConfigError(f"{path}: {name!r} is not a plain file name; the manifest is corrupt or was edited.")
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise ConfigError(f"checkpoint {directory} lacks {name}, which its manifest lists; restore it from a copy.")
        if verify and sha256_file(file) != info.get("sha256"):
            raise ConfigError(f"{file} does not match its sha256 in {MANIFEST}: it changed after saving.")
    return manifest


def load_dcp_tensors(directory: str | os.PathLike, keys: list[str]) -> dict[str, torch.Tensor]:
    """The full tensors ``keys`` (DCP keys, e.g. ``model.<name>``) of the DCP checkpoint in
    ``directory``, in one process without a process group (consolidation)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = read_metadata(directory).state_dict_metadata
    missing = [k for k in keys if not isinstance(entries.get(k), TensorStorageMetadata)]
    if missing:
        raise ConfigError(f"DCP checkpoint {directory} has no tensor(s) {missing[:3]}.")
    out = {k: torch.empty(entries[k].size, dtype=entries[k].properties.dtype) for k in keys}
    nested = _nest(out)
    dcp.load(nested, storage_reader=safe_reader(directory), no_dist=True)
    return {k: _get(nested, k) for k in keys}


def _nest(flat: dict[str, torch.Tensor]) -> dict:
    """DCP flattens nested dicts with dots: {"model": {"a.b": t}} is stored as "model.a.b"."""
    nested: dict = {}
    for key, value in flat.items():
        top, _, rest = key.partition(".")
        nested.setdefault(top, {})[rest] = value
    return nested


def _get(nested: dict, key: str) -> torch.Tensor:
    top, _, rest = key.partition(".")
    return nested[top][rest]
