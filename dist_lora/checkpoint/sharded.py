"""Per-rank sharded adapter checkpoints that record where every shard sits.

Layout of a checkpoint directory::

    adapter_config.json
    shard-pp000-tp001.safetensors   one file per (PP stage, TP rank) of data-parallel rank 0
    optim-pp000-tp001.safetensors   with an optimizer: its state, sharded like the adapter
    rng-rank00000.pt                with a trainer state: each rank's RNG states
    manifest.json                   written last: layout, and per file its sha256 and, per
                                    tensor, the global shape, this piece's offsets and dtype
                                    (schema and reader: :mod:`.manifest`; pieces
                                    and their assembly: :mod:`.pieces`)

Tensor keys are layout-independent: ``<global module name>.lora_A.weight`` (megatron layer
and MoE expert indices are global, see :mod:`dist_lora.naming`). A replicated tensor is written
once (by TP rank 0), a TP-sharded one once per TP rank. MoE expert adapters live on the EP rank
that owns the expert and are split over expert-TP: expert-data-parallel rank 0 of each
(expert-TP, EP) position writes them to its own file ``shard-ppP-tpT-epE.safetensors``
(T the expert-TP rank), so a checkpoint saved at one EP size loads at another. The directory is written under a temporary name
and renamed when complete, so a crash leaves the previous checkpoint untouched. The loader
cuts each rank's slice out of whatever pieces cover it, so a checkpoint saved at one TP size
loads at another.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..config import CONFIG_NAME, ConfigError
from ..io import AtomicDirectory, atomic_path, atomic_write_text
from ..parallel.grads import is_expert_parameter
from .manifest import (  # noqa: F401  (MANIFEST, FORMAT, read_manifest, sha256_file: this module's public face too)
    FORMAT,
    LEGACY_FORMATS,
    MANIFEST,
    check_file,
    read_adapter_config,
    read_manifest,
    rng_file_name,
    sha256_file,
)
from .ownership import (  # noqa: F401  (parallel_ranks, owned_parameters, param_tp_rank_size: this module's public face too)
    layout_record,
    local_tensors,
    owned_parameters,
    param_tp_rank_size,
    parallel_ranks,
    shard_file_of,
)
from .peft_format import resolve_parameter, set_tensor
from .pieces import Scratch, ShardFiles, StoredTensor, assemble, check_coverage, index_tensors, shard_pieces, tp_boxes

if TYPE_CHECKING:
    from ..model import LoraModel


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_file(staging: str, file_name: str, pieces: list) -> dict:
    """Write pieces to one safetensors file; its manifest record (sha256 + entries)."""
    if not pieces:
        return {}
    path = os.path.join(staging, file_name)
    tensors, storages = {}, set()
    for file_key, tensor, _ in pieces:  # an expert adapter shared by a layer's experts: one parameter, several keys
        storage = tensor.untyped_storage().data_ptr()
        tensors[file_key] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    return {"sha256": sha256_file(path), "tensors": {file_key: entry for file_key, _, entry in pieces}}


def _gather_records(record: dict) -> list[dict]:
    if not dist.is_initialized():
        return [record]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, record)
    return gathered


@torch.no_grad()
def save_sharded(
    model: "LoraModel",
    directory: str | os.PathLike,
    adapter: Optional[str] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainer_state: Optional[dict] = None,
) -> None:
    """Write ``adapter`` of a (possibly TP/PP-sharded) model; every rank must call it.

    With ``optimizer`` its per-parameter state is saved too, sharded like the parameters
    (``optim-*.safetensors``, so it reshards on load like the adapter), plus its hyper-
    parameters. ``trainer_state`` is any JSON-able dict (step, data position, ...); with it,
    each rank's RNG states go into ``rng-rank*.pt`` so that a resume at the same layout
    continues the same random streams.
    """
    adapter = adapter or model.active_adapters[0]
    directory = os.fspath(directory)
    ranks = parallel_ranks()
    target = AtomicDirectory(directory, staging_name=os.path.basename(directory) + ".partial")
    staging = target.staging  # known to every rank; rank 0 creates it, every rank writes into it
    if _is_rank0():
        target.create()
    _barrier()
    records = _gather_records(_write_rank_files(model, staging, adapter, optimizer, trainer_state is not None, ranks))
    _barrier()
    if _is_rank0():
        config_path = model.peft_config[adapter].save_pretrained(staging)
        manifest = {
            "format": FORMAT,
            "adapter_name": adapter,
            "layout": layout_record(model, ranks, len(records)),
            "files": dict(item for r in records for item in r["shard"] if item[1]),
            "config": {CONFIG_NAME: {"sha256": sha256_file(config_path)}},
        }
        if optimizer is not None:
            manifest["optimizer"] = {
                "files": dict(item for r in records for item in r["optim"] if item[1]),
                "scalars": {k: v for r in records for k, v in r["scalars"].items()},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
            }
        if trainer_state is not None:
            manifest["trainer_state"] = trainer_state
            manifest["rng"] = dict(r["rng"] for r in records)
        atomic_write_text(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        target.commit()  # the previous checkpoint goes only after the new one is in place
    _barrier()


def _write_rank_files(
    model: "LoraModel", staging: str, adapter: str, optimizer: Optional[torch.optim.Optimizer], rng: bool, ranks: dict
) -> dict:
    """Write this rank's adapter / optimizer shards (and ``rng``: its RNG states); its manifest
    records: ``shard`` / ``optim`` / ``rng`` as (file name, record), ``scalars``."""
    pieces: dict[str, dict[str, list]] = {"shard": {}, "optim": {}}  # kind -> file name -> pieces
    optim_scalars = {}
    for key, param in owned_parameters(model, adapter, ranks):
        rank, size = param_tp_rank_size(param, ranks)
        pieces["shard"].setdefault(shard_file_of("shard", param, ranks), []).extend(
            shard_pieces(key, param, param, rank, size)
        )
        for name, value in (optimizer.state.get(param, {}) if optimizer is not None else {}).items():
            if torch.is_tensor(value) and value.shape == param.shape:
                pieces["optim"].setdefault(shard_file_of("optim", param, ranks), []).extend(
                    shard_pieces(f"{key}::{name}", value, param, rank, size)
                )
            else:
                optim_scalars[f"{key}::{name}"] = value.item() if torch.is_tensor(value) else value
    record = {"scalars": optim_scalars}
    for kind, files in pieces.items():
        record[kind] = [(name, _write_file(staging, name, file_pieces)) for name, file_pieces in sorted(files.items())]
    if rng:
        name = rng_file_name(dist.get_rank() if dist.is_initialized() else 0)
        with atomic_path(os.path.join(staging, name)) as tmp:
            torch.save(_rng_states(), tmp)
        record["rng"] = (name, {"sha256": sha256_file(os.path.join(staging, name))})
    return record


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        if tracker.is_initialized():
            states["tracker"] = {name: state.clone() for name, state in tracker.get_states().items()}
    except ImportError:
        pass
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def read_rng_states(directory: str | os.PathLike) -> Optional[dict]:
    """This rank's RNG states saved with the checkpoint, checked (checksum, safe load, types);
    None when there are none for this layout (saved without a trainer state, or by a different
    number of ranks). Raises a ConfigError naming the file when it is not a valid RNG file."""
    directory = os.fspath(directory)
    manifest = read_manifest(directory, verify=False, parts=("adapter",))
    world = dist.get_world_size() if dist.is_initialized() else 1
    name = rng_file_name(dist.get_rank() if dist.is_initialized() else 0)
    if manifest["layout"]["world"] != world:
        return None
    if manifest["format"] in LEGACY_FORMATS:  # no checksums for RNG files yet
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return None
    elif name not in manifest.get("rng", {}):
        return None
    else:
        path = check_file(directory, name, manifest["rng"][name])
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"{path} is not a readable RNG state file ({type(e).__name__}: {detail}): "
            "restore it from a copy of the checkpoint, or resume from another checkpoint."
        ) from None
    _check_rng_states(states, path)
    return states


def _check_rng_states(states: object, path: str) -> None:
    generator = torch.get_rng_state()
    ok = isinstance(states, dict) and torch.is_tensor(states.get("torch"))
    ok = ok and states["torch"].dtype == generator.dtype and states["torch"].shape == generator.shape
    tracker = states.get("tracker", {}) if ok else {}
    ok = ok and isinstance(tracker, dict) and all(torch.is_tensor(v) for v in tracker.values())
    ok = ok and ("cuda" not in states or torch.is_tensor(states["cuda"]))
    if not ok:
        raise ConfigError(
            f"{path} does not hold RNG states (a dict with the torch generator state, as save_sharded writes): "
            "restore it from a copy of the checkpoint, or resume from another checkpoint."
        )


def restore_rng_states(directory: str | os.PathLike) -> bool:
    """Restore this rank's RNG states saved with the checkpoint; False (nothing restored)
    when there are none for this layout (see :func:`read_rng_states`)."""
    return apply_rng_states(read_rng_states(directory))


def apply_rng_states(states: Optional[dict]) -> bool:
    """Set this rank's RNG states from :func:`read_rng_states`' result; False for None."""
    if states is None:
        return False
    torch.set_rng_state(states["torch"])
    if "tracker" in states:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    return True


def _read_local(
    files: ShardFiles, tensors: dict[str, StoredTensor], key: str, param: torch.Tensor, ranks: dict
) -> torch.Tensor:
    """This rank's part of global tensor ``key``, shaped and placed like ``param``."""
    if key not in tensors:
        raise ConfigError(
            f"checkpoint {files.directory} has no tensor {key}: it was saved from a different model or config."
        )
    stored = tensors[key]
    global_shape, boxes = tp_boxes(param, *param_tp_rank_size(param, ranks))
    if list(stored.global_shape) != global_shape:
        raise ConfigError(
            f"{key}: global shape {list(stored.global_shape)} in the checkpoint, the model has {global_shape}."
        )
    check_coverage(stored, ranks["saved_etp" if is_expert_parameter(param) else "saved_tp"])
    value, scratch = torch.empty(param.shape, dtype=stored.dtype), Scratch()
    for index, offsets, _ in boxes:
        assemble(stored, files, value[index], offsets, scratch)
    return value


def load_sharded(
    model: "LoraModel",
    directory: str | os.PathLike,
    adapter: Optional[str] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    verify: bool = True,
) -> dict:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``) at this process's layout,
    whatever TP size it was saved at; returns the saved trainer state ({} if none).

    If ``adapter`` is new it is created from the checkpoint's config first. Everything is
    read and checked before the model or optimizer changes.
    """
    directory = os.fspath(directory)
    manifest = read_manifest(directory, verify=verify, parts=("adapter", "optimizer") if optimizer else ("adapter",))
    adapter = adapter or manifest["adapter_name"]
    if optimizer is not None and "optimizer" not in manifest:
        raise ConfigError(f"checkpoint {directory} has no optimizer state (it was saved without one).")
    created = adapter not in model.peft_config
    if created:
        model.add_adapter(adapter, read_adapter_config(directory), low_cpu_mem_usage=True)
    layout = manifest["layout"]
    ranks = {**parallel_ranks(), "saved_tp": layout["tp"], "saved_etp": layout.get("etp", layout["tp"])}
    try:
        with ShardFiles(directory) as files:
            tensors = index_tensors(directory, manifest["files"])
            updates = []
            for key, (module, path) in local_tensors(model, adapter).items():
                sub, pname = resolve_parameter(module, path, adapter)
                updates.append((key, sub, pname, _read_local(files, tensors, key, getattr(sub, pname), ranks)))
            optim_states = _read_optimizer_states(files, manifest, optimizer, updates, ranks) if optimizer else {}
        _check_shared_values(updates, directory)
    except Exception:
        if created:
            model.discard_adapter(adapter)
        raise
    for _, sub, pname, value in updates:
        set_tensor(sub, pname, value)
    if optimizer is not None:
        for key, sub, pname, _ in updates:
            if key in optim_states:
                optimizer.state[getattr(sub, pname)] = optim_states[key]
        for group, saved in zip(optimizer.param_groups, manifest["optimizer"]["param_groups"]):
            group.update(saved)
    return manifest.get("trainer_state", {})


def _check_shared_values(updates: list, directory: str) -> None:
    """A parameter several keys load into (an adapter shared by the experts of a layer, saved as
    per-expert copies) must get the same value from each: a checkpoint of per-expert adapters
    does not fit a shared-adapter model."""
    first: dict[int, tuple[str, torch.Tensor]] = {}
    for key, sub, pname, value in updates:
        seen = first.setdefault(id(getattr(sub, pname)), (key, value))
        if seen[1] is not value and not torch.equal(seen[1], value):
            raise ConfigError(
                f"checkpoint {directory}: {seen[0]} and {key} load into one shared expert adapter "
                "(runtime_config.expert_adapters='shared') but differ: the checkpoint holds per-expert adapters; "
                "load it with expert_adapters='per_expert'."
            )


def _read_optimizer_states(files: ShardFiles, manifest: dict, optimizer, updates: list, ranks: dict) -> dict:
    """Per adapter key, the optimizer state of the local parameter (tensors sliced like it)."""
    section = manifest["optimizer"]
    tensors = index_tensors(files.directory, section["files"])
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    states: dict[str, dict] = {}
    for key, sub, pname, _ in updates:
        param = getattr(sub, pname)
        if id(param) not in trained:
            continue
        state = {}
        for state_key in tensors:
            if state_key.startswith(f"{key}::"):
                state[state_key.split("::", 1)[1]] = _read_local(files, tensors, state_key, param, ranks).to(param.dtype)
        for state_key, value in section["scalars"].items():
            if state_key.startswith(f"{key}::"):
                state[state_key.split("::", 1)[1]] = torch.tensor(value, dtype=torch.float32)
        if not state:
            raise ConfigError(f"checkpoint {files.directory} has no optimizer state for {key}.")
        states[key] = state
    return states
