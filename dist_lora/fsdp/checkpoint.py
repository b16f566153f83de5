"""DCP checkpoints of an FSDP2 LoRA model: adapters and optimizer state only, sharded.

    save_fsdp_checkpoint(root, step, model, optimizer, keep_last=2)   # every rank
    state = load_fsdp_checkpoint(root, model, optimizer)             # any world size; state["step"]

Format: :mod:`dist_lora.checkpoint.dcp_format`. The tensors come from
``get_model_state_dict(model, StateDictOptions(ignore_frozen_params=True))`` (the trainable
adapter parameters only, never the frozen base) and ``get_optimizer_state_dict`` (state keyed
by parameter name), each rank writing its own shards. DCP reshards on load, so a run saved at
DP=2 resumes at DP=1 or DP=4. :func:`async_save_fsdp_checkpoint` writes in the background
(state copied to host memory first) and completes the checkpoint in :meth:`PendingSave.wait`.

Atomic: the ranks write into ``<root>/.step_N.partial``; when every rank is done rank 0 adds
``adapter_config.json`` and ``manifest.json`` and renames it to ``step_N``
(:class:`~dist_lora.io.AtomicDirectory`), then ``latest`` and pruning follow the megatron path's
rules (:func:`~dist_lora.checkpoint.training.publish_checkpoint`). A ``kill -9`` of any rank
during a save leaves the previous checkpoint and ``latest`` as they were.

Loading checks, on every rank and before the model or optimizer changes, that the checkpoint
is for this model: the adapter config (every field but ``inference_mode``), the base model
(class and sizes) and every adapter tensor's name and global shape; a mismatch names the
first difference. RNG states are not saved (the FSDP2 path has no dropout-free guarantee to
keep; dropout masks after a resume differ from an uninterrupted run).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoint.dcp_format import read_dcp_manifest, safe_reader, write_manifest
from ..checkpoint.manifest import read_adapter_config
from ..checkpoint.training import check_keep_last, publish_checkpoint, resolve_checkpoint, step_directory
from ..config import ConfigError
from ..io import AtomicDirectory
from ..model import LoraModel
from ..parallel.collectives import raise_together

_BASE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head")


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _state(model: LoraModel, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model, options=_options())}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=_options())
    return state


def base_model_description(model: LoraModel) -> dict:
    """The base model's class and sizes, as recorded in a checkpoint and compared on load."""
    config = getattr(model.model, "config", None)
    fields = {f: getattr(config, f) for f in _BASE_FIELDS if getattr(config, f, None) is not None}
    return {"class": type(model.model).__name__, **fields}


def _global_shapes(state: dict) -> dict[str, list[int]]:
    return {f"model.{k}": list(v.shape) for k, v in state["model"].items()}


def _adapter_name(model: LoraModel) -> str:
    trained = [n for n in model.active_adapters if not model.peft_config[n].inference_mode]
    if len(trained) != 1:
        raise ValueError(f"an FSDP2 checkpoint holds one trained adapter; {trained or 'none'} are active and trainable.")
    return trained[0]


def save_fsdp_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: LoraModel,
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainer_state: Optional[dict] = None,
    keep_last: Optional[int] = 2,
) -> str:
    """Save step ``step`` under ``root`` (every rank calls this); returns its directory."""
    import torch.distributed.checkpoint as dcp

    save = _SaveStep(root, step, model, optimizer, trainer_state, keep_last)
    dcp.save(save.state, checkpoint_id=save.target.staging)  # collective: every rank writes its shards
    return save.finish()


class PendingSave:
    """An asynchronous save in flight (:func:`async_save_fsdp_checkpoint`): :meth:`wait` (every
    rank, before the next save) blocks until every rank's shards are written, then completes
    the checkpoint as a synchronous save does and returns its directory."""

    def __init__(self, future, save: "_SaveStep") -> None:
        self._future, self._save = future, save

    def wait(self) -> str:
        self._future.result()
        return self._save.finish()


_ASYNC_GROUP: dict = {}  # the default group -> a gloo group for DCP's background collectives


def async_save_fsdp_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: LoraModel,
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainer_state: Optional[dict] = None,
    keep_last: Optional[int] = 2,
) -> PendingSave:
    """:func:`save_fsdp_checkpoint` with the writing in a background thread
    (``dcp.async_save``): the state is first copied to host memory, so training may go on
    (and change the parameters) at once. DCP's collectives run on a process group of their own
    (gloo), never interleaving with training's. Call :meth:`PendingSave.wait` on every rank
    before the next save; until then ``latest`` still names the previous checkpoint."""
    import torch.distributed.checkpoint as dcp

    world = dist.group.WORLD  # a new default group (destroyed and re-initialised) gets a new one
    if world not in _ASYNC_GROUP:
        _ASYNC_GROUP.clear()
        _ASYNC_GROUP[world] = dist.new_group(backend="gloo")
    save = _SaveStep(root, step, model, optimizer, trainer_state, keep_last)
    future = dcp.async_save(save.state, checkpoint_id=save.target.staging, process_group=_ASYNC_GROUP[world])
    return PendingSave(future, save)


class _SaveStep:
    """One save: staging directory made (rank 0), state taken; :meth:`finish` completes it."""

    def __init__(self, root, step, model, optimizer, trainer_state, keep_last) -> None:
        check_keep_last(keep_last)
        self.root, self.step, self.keep_last = root, step, keep_last
        self.adapter = _adapter_name(model)
        self.config = model.peft_config[self.adapter]
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        path = step_directory(root, step)
        self.target = AtomicDirectory(path, staging_name=f".{os.path.basename(path)}.partial")
        if self.rank0:
            self.target.create()
        if dist.is_initialized():
            dist.barrier()
        self.state = _state(model, optimizer)
        self.manifest = {
            "adapter_name": self.adapter,
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "base_model": base_model_description(model),
            "tensors": _global_shapes(self.state),
            "optimizer": optimizer is not None,
            "trainer_state": {"step": step, **(trainer_state or {})},
        }

    def finish(self) -> str:
        """After every rank wrote its shards: rank 0 adds the config and the manifest and
        renames the staging directory into place; then ``latest`` and pruning."""
        if dist.is_initialized():
            dist.barrier()
        error = None
        if self.rank0:
            try:
                self.config.save_pretrained(self.target.staging)
                write_manifest(self.target.staging, self.manifest)
                self.target.commit()
            except (OSError, ValueError) as e:
                self.target.discard()
                error = e
        if dist.is_initialized():
            raise_together(error)
        elif error is not None:
            raise error
        publish_checkpoint(self.root, self.step, self.keep_last)
        return self.target.path


def _as_json(value):
    """``value`` as it reads back from JSON (tuples as lists, sets as sorted lists)."""
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def check_compatible(manifest: dict, model: LoraModel, shapes: dict[str, list[int]], path: str) -> None:
    """Raise ConfigError naming the first difference between the checkpoint and this model."""
    adapter = _adapter_name(model)
    if manifest["adapter_name"] != adapter:
        raise ConfigError(f"checkpoint {path} holds adapter {manifest['adapter_name']!r}, the model trains {adapter!r}.")
    saved = _as_json(read_adapter_config(path).to_dict())
    ours = _as_json(model.peft_config[adapter].to_dict())
    for key in sorted(set(saved) | set(ours)):
        if key != "inference_mode" and saved.get(key) != ours.get(key):
            raise ConfigError(f"checkpoint {path} was trained with another adapter config: {key}={saved.get(key)!r} "
                              f"there, {ours.get(key)!r} here. Resume with the run's config.")
    base = base_model_description(model)
    for key in sorted(set(base) | set(manifest["base_model"])):
        if base.get(key) != manifest["base_model"].get(key):
            raise ConfigError(f"checkpoint {path} is from another base model: {key}={manifest['base_model'].get(key)!r} "
                              f"there, {base.get(key)!r} here.")
    if shapes != manifest["tensors"]:
        diff = sorted(set(shapes) ^ set(manifest["tensors"])) or [k for k in shapes if shapes[k] != manifest["tensors"][k]]
        raise ConfigError(f"checkpoint {path} does not fit this model's adapter tensors (first difference: {diff[0]}).")


def load_fsdp_checkpoint(
    path: str | os.PathLike, model: LoraModel, optimizer: Optional[torch.optim.Optimizer] = None, verify: bool = True
) -> dict:
    """Load a DCP checkpoint (a step directory, or a root with ``latest``) into the sharded
    ``model`` (and ``optimizer``) at this world size; returns its trainer state (``step``, ``path``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    error, manifest = None, None
    try:
        path = resolve_checkpoint(path)
        manifest = read_dcp_manifest(path, verify=verify)
        if optimizer is not None and not manifest.get("optimizer"):
            raise ConfigError(f"checkpoint {path} has no optimizer state (it was saved without one).")
        model_state = _state(model, None)
        check_compatible(manifest, model, _global_shapes(model_state), path)
    except (ConfigError, ValueError, OSError) as e:
        error = e
    if dist.is_initialized():
        raise_together(error)
    elif error is not None:
        raise error
    state = _state(model, optimizer)
    dcp.load(state, storage_reader=safe_reader(path))
    set_model_state_dict(model, state["model"], options=_options(strict=False))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_options(strict=False))
    return {**manifest.get("trainer_state", {}), "path": path}
