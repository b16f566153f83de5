"""Per-rank sharded adapter checkpoints that record where every shard sits.

Layout of a checkpoint directory::

    adapter_config.json
    shard-pp000-tp001.safetensors   one file per (PP stage, TP rank) of data-parallel rank 0
    manifest.json                   written last: layout, and per file its sha256 and, per
                                    tensor, the global shape, this piece's offsets and dtype

Tensor keys are layout-independent: ``<global module name>.lora_A.weight`` (megatron layer
indices are global, see :mod:`dist_lora.naming`). A replicated tensor is written once (by TP
rank 0), a TP-sharded one once per TP rank. The directory is written under a temporary name
and renamed when complete, so a crash leaves the previous checkpoint untouched. The loader
cuts each rank's slice out of whatever pieces cover it, so a checkpoint saved at one TP size
loads at another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError, LoraConfig
from ..io import atomic_path, atomic_write_text
from ..layers.base import LoraLayer
from ..naming import global_module_name
from ..parallel.tp import partition_stride
from .peft_format import expected_keys, resolve_parameter, set_tensor

if TYPE_CHECKING:
    from ..model import LoraModel

MANIFEST = "manifest.json"
FORMAT = "dist_lora.sharded/1"


def _ranks() -> dict[str, int]:
    """This process's TP / PP / DP coordinates and sizes (all 0/1 without megatron state)."""
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return {
                "tp": ps.get_tensor_model_parallel_rank(),
                "tp_size": ps.get_tensor_model_parallel_world_size(),
                "pp": ps.get_pipeline_model_parallel_rank(),
                "pp_size": ps.get_pipeline_model_parallel_world_size(),
                "dp": ps.get_data_parallel_rank(),
            }
    except ImportError:
        pass
    return {"tp": 0, "tp_size": 1, "pp": 0, "pp_size": 1, "dp": 0}


def _boxes(param: torch.Tensor, tp_rank: int, tp_size: int) -> tuple[list[int], list[tuple]]:
    """Where a local tensor sits in its global (TP=1) tensor, from megatron's sharding markers.

    Returns the global shape and one box per stride piece: (local index, global offsets,
    shape). A strided shard (stride s: a gated fc1 holds [gate_i; up_i]) is s boxes.
    """
    shape = list(param.shape)
    everything = tuple(slice(None) for _ in shape)
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return shape, [(everything, [0] * len(shape), shape)]
    dim, stride = param.partition_dim, partition_stride(param)
    piece = shape[dim] // stride
    global_shape = shape.copy()
    global_shape[dim] = shape[dim] * tp_size
    boxes = []
    for k in range(stride):
        index, offsets, box = list(everything), [0] * len(shape), shape.copy()
        index[dim] = slice(k * piece, (k + 1) * piece)
        offsets[dim] = k * (global_shape[dim] // stride) + tp_rank * piece
        box[dim] = piece
        boxes.append((tuple(index), offsets, box))
    return global_shape, boxes


def _local_tensors(model: "LoraModel", adapter: str) -> dict[str, tuple[torch.nn.Module, str]]:
    return expected_keys(model, adapter, module_key=lambda name: global_module_name(model.model, name))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(model: "LoraModel", directory: str | os.PathLike, adapter: Optional[str] = None) -> None:
    """Write ``adapter`` of a (possibly TP/PP-sharded) model. Every rank must call it."""
    adapter = adapter or model.active_adapters[0]
    directory = os.fspath(directory)
    ranks = _ranks()
    staging = directory + ".partial"
    if _is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    _barrier()
    entries, file_name = {}, f"shard-pp{ranks['pp']:03d}-tp{ranks['tp']:03d}.safetensors"
    if ranks["dp"] == 0:
        tensors = {}
        for key, (module, path) in _local_tensors(model, adapter).items():
            sub, pname = resolve_parameter(module, path, adapter)
            param = getattr(sub, pname)
            sharded = getattr(param, "tensor_model_parallel", False) and ranks["tp_size"] > 1
            if not sharded and ranks["tp"] != 0:
                continue  # a replicated tensor is written once, by TP rank 0
            global_shape, boxes = _boxes(param, ranks["tp"], ranks["tp_size"])
            for k, (index, offsets, shape) in enumerate(boxes):
                file_key = key if len(boxes) == 1 else f"{key}@{k}"
                tensors[file_key] = param.detach()[index].contiguous().cpu()
                entries[file_key] = {
                    "key": key,
                    "global_shape": global_shape,
                    "offsets": offsets,
                    "shape": shape,
                    "dtype": str(param.dtype).removeprefix("torch."),
                }
        if tensors:
            path = os.path.join(staging, file_name)
            with atomic_path(path) as tmp:
                save_file(tensors, tmp, metadata={"format": "pt"})
            entries = {"sha256": _sha256(path), "tensors": entries}
    gathered = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, (file_name, entries))
    else:
        gathered = [(file_name, entries)]
    if _is_rank0():
        files = {name: info for name, info in gathered if info}
        manifest = {
            "format": FORMAT,
            "adapter_name": adapter,
            "layout": {"tp": ranks["tp_size"], "pp": ranks["pp_size"]},
            "files": files,
        }
        model.peft_config[adapter].save_pretrained(staging)
        atomic_write_text(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        _replace_directory(staging, directory)
    _barrier()


def _replace_directory(staging: str, directory: str) -> None:
    """Swap the complete staging directory into place; the old checkpoint goes only after."""
    old = directory + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(staging, directory)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of a complete checkpoint; raises naming what is missing or corrupt."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError(f"{directory} has no {MANIFEST}: the checkpoint is incomplete or not a dist_lora checkpoint.")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: unknown checkpoint format {manifest.get('format')!r}, expected {FORMAT!r}.")
    for name, info in manifest["files"].items():
        file_path = os.path.join(directory, name)
        if not os.path.isfile(file_path):
            raise ConfigError(f"checkpoint {directory} is missing {name} (tensors {sorted(info['tensors'])[:3]} ...).")
        if verify and _sha256(file_path) != info["sha256"]:
            raise ConfigError(f"checksum mismatch for {file_path}: the file is corrupt or was changed after saving.")
    return manifest


def load_sharded(
    model: "LoraModel", directory: str | os.PathLike, adapter: Optional[str] = None, verify: bool = True
) -> None:
    """Load a sharded checkpoint into ``model`` at this process's layout (any TP size).
    If ``adapter`` is new it is created from the checkpoint's config first."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory, verify=verify)
    adapter = adapter or manifest["adapter_name"]
    if adapter not in model.peft_config:
        model.add_adapter(adapter, LoraConfig.from_pretrained(directory), low_cpu_mem_usage=True)
    pieces: dict[str, list[tuple[str, dict]]] = {}
    for name, info in manifest["files"].items():
        for file_key, entry in info["tensors"].items():
            pieces.setdefault(entry["key"], []).append((name, file_key, entry))
    ranks = _ranks()
    updates = []
    for key, (module, path) in _local_tensors(model, adapter).items():
        sub, pname = resolve_parameter(module, path, adapter)
        param = getattr(sub, pname)
        if key not in pieces:
            raise ConfigError(f"checkpoint {directory} has no tensor {key}: it was saved from a different model or config.")
        global_shape, boxes = _boxes(param, ranks["tp"], ranks["tp_size"])
        if pieces[key][0][2]["global_shape"] != global_shape:
            raise ConfigError(
                f"{key}: global shape {pieces[key][0][2]['global_shape']} in the checkpoint, the model has {global_shape}."
            )
        value = torch.empty(param.shape, dtype=getattr(torch, pieces[key][0][2]["dtype"]))
        for index, offsets, shape in boxes:
            value[index] = _assemble(directory, key, pieces[key], offsets, shape)
        updates.append((sub, pname, value))
    for sub, pname, value in updates:
        set_tensor(sub, pname, value)


def _assemble(directory: str, key: str, pieces: list, offsets: list, shape: list) -> torch.Tensor:
    """Cut the box [offsets, offsets + shape) of a global tensor out of the saved pieces."""
    out = torch.empty(shape, dtype=getattr(torch, pieces[0][2]["dtype"]))
    covered = 0
    for file_name, file_key, entry in pieces:
        lo = [max(a, b) for a, b in zip(offsets, entry["offsets"])]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, shape, entry["offsets"], entry["shape"])]
        if any(l >= h for l, h in zip(lo, hi)):
            continue
        with safe_open(os.path.join(directory, file_name), framework="pt") as f:
            src = f.get_slice(file_key)[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, entry["offsets"]))]
        out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))] = src
        covered += src.numel()
    if covered != out.numel():
        raise ConfigError(
            f"{key}: the checkpoint's pieces cover {covered} of the {out.numel()} values this rank needs "
            "(a shard file is missing from the manifest?)."
        )
    return out
