"""Read the trainable fp32 tensors of a DeepSpeed ZeRO checkpoint, without DeepSpeed and
without a process group, unpickling nothing but tensors and a few plain records.

Layout written by ``engine.save_checkpoint(save_dir)`` (DeepSpeed 0.19, ZeRO stage 1/2/3,
data-parallel size W, no model parallelism: ``mp_rank_00``)::

    save_dir/latest                               the tag of the newest checkpoint, e.g. "global_step3"
    save_dir/<tag>/mp_rank_00_model_states.pt     stage 1/2: one file (rank 0 writes it)
    save_dir/<tag>/zero_pp_rank_<d>_mp_rank_00_model_states.pt    stage 3: one per rank d < W
    save_dir/<tag>/zero_pp_rank_<d>_mp_rank_00_optim_states.pt    one per rank d < W

model states (a dict): ``module`` (the module state dict: at stage 1/2 the working-precision
weights, at stage 3 empty placeholders), ``param_shapes`` (one ordered {name: Size} per
optimizer parameter group, trainable parameters only, in flattening order),
``frozen_param_shapes`` / ``frozen_param_fragments`` (the frozen base), ``dp_world_size``,
``mp_world_size``, ``ds_config``, ``ds_version``.

optim states: ``optimizer_state_dict`` with ``zero_stage`` and ``partition_count`` and the fp32
master weights of this rank:

* stage 1/2, ``single_partition_of_fp32_groups[g]``: group g's parameters are flattened in
  ``param_shapes[g]`` order (each followed by ``param_alignment_paddings[g][i]`` zeros, when
  that list is present) into one vector, padded to a multiple of 2·W, and cut into W
  consecutive pieces; rank d holds piece d. A parameter at offset o of the group vector is
  ``cat(pieces)[o : o + numel]``.
* stage 3, ``fp32_flat_groups[g]``: every parameter p (groups in order, parameters in
  ``param_shapes`` order) is split on its own: padded to W·c elements, c = ceil(numel / W),
  and rank d holds its elements [d·c, (d+1)·c), appended to rank d's flat vector (its groups
  concatenated). A parameter at running offset o (the sum of the earlier parameters' c) is
  ``cat(rank_d_flat[o : o + c] for d)[: numel]``; in the end W·Σc equals the stored total.

Safety: files are opened with ``torch.load(weights_only=True, mmap=True)``. DeepSpeed pickles
three non-tensor objects into the optimizer files (its ``LossScaler``, the ``ZeroStageEnum``
and ``tensor_fragment.fragment_address``); they are mapped to the inert stand-in classes below
(torch's ``safe_globals`` with explicit names), so no DeepSpeed code and no other global is
ever run. Anything else a file pickles (e.g. a ``client_state`` object) is refused with the
name of the global.

Only what is read is memory: ``mmap`` maps the files, and a tensor is assembled from its
slices when asked for (:meth:`DeepSpeedCheckpoint.tensor`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
from typing import Any, Optional

import torch

from ..config import ConfigError
from ..io import is_plain_file_name

LATEST = "latest"
_OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
_MODEL_Z12 = "mp_rank_00_model_states.pt"
_MODEL_Z3 = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
_ANY_STATES = re.compile(r"(zero_pp_rank_\d+_)?mp_rank_\d+_(model|optim)_states\.pt")


class DeepSpeedCheckpointError(ConfigError):
    """The DeepSpeed checkpoint is missing, incomplete, corrupt or of an unsupported kind;
    the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------
# Inert stand-ins for the DeepSpeed objects in the optimizer files (never DeepSpeed's classes).


class _Record:
    """A pickled object reduced to its attribute dict (BUILD sets ``__dict__``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__dict__})"


class _LossScaler(_Record):
    pass


class _FragmentAddress(_Record):
    pass


class _ZeroStage:
    """``ZeroStageEnum(value)``: an enum pickles as a call of its class with the value."""

    def __init__(self, value: Any) -> None:
        self.value = int(value)

    def __int__(self) -> int:
        return self.value


SAFE_GLOBALS = [
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def safe_load(path: str) -> Any:
    """``torch.load`` with ``weights_only=True`` and only the stand-ins above allowed."""
    if not os.path.isfile(path):
        raise DeepSpeedCheckpointError(f"{path} does not exist.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "global" in line), first[0] if first else "")
        raise DeepSpeedCheckpointError(
            f"{path} pickles an object this reader refuses to unpickle ({detail.strip()}). Only tensors, plain "
            "containers and DeepSpeed's LossScaler / ZeroStageEnum / fragment_address records are read; a "
            "client_state with other objects cannot be loaded safely. Save it without them."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DeepSpeedCheckpointError(
            f"{path} is not a readable torch checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
            "the file is corrupt or truncated (was the save interrupted?)."
        ) from None


# ---------------------------------------------------------------------------------------------
# The fields read from the files (checked before use: the error names the file and the field)


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_field(ok: bool, path: str, field: str, what: str, value: Any) -> None:
    if not ok:
        got = type(value).__name__ if isinstance(value, (dict, list, tuple)) else repr(value)
        raise DeepSpeedCheckpointError(
            f"{path}: {field} must be {what}, got {got}. The file was not written by DeepSpeed's "
            "engine.save_checkpoint or was changed afterwards: use the files as DeepSpeed wrote them."
        )


def _is_shape(value: Any) -> bool:
    return isinstance(value, (torch.Size, list, tuple)) and all(_is_count(n) for n in value)


def _check_model_states(states: dict, path: str) -> None:
    groups = states["param_shapes"]
    ok = isinstance(groups, list) and all(
        isinstance(g, dict) and all(isinstance(k, str) and _is_shape(v) for k, v in g.items()) for g in groups
    )
    _check_field(ok, path, "param_shapes", "a list (one per parameter group) of {name: shape}", groups)
    for field in ("dp_world_size", "mp_world_size"):
        value = states.get(field)
        _check_field(value is None or _is_count(value, 1), path, field, "an integer >= 1", value)
    dims = states.get("checkpoint_parallel_dimensions")
    _check_field(dims is None or isinstance(dims, dict), path, "checkpoint_parallel_dimensions", "a dict", dims)
    pp = (dims or {}).get("pp_degree")
    field = "checkpoint_parallel_dimensions.pp_degree"
    _check_field(pp is None or _is_count(pp, 1), path, field, "an integer >= 1", pp)
    for field in ("module", "frozen_param_shapes"):
        value = states.get(field)
        _check_field(value is None or isinstance(value, dict), path, field, "a dict", value)


def _check_optim_states(osd: dict, path: str) -> None:
    stage = osd["zero_stage"]
    ok = isinstance(stage, _ZeroStage) or _is_count(stage)
    _check_field(ok, path, "optimizer_state_dict.zero_stage", "an integer (the ZeRO stage)", stage)
    counts = osd.get("partition_count")
    ok = _is_count(counts, 1) or (isinstance(counts, list) and bool(counts) and all(_is_count(c, 1) for c in counts))
    _check_field(ok, path, "optimizer_state_dict.partition_count", "an integer >= 1 or a list of them", counts)
    paddings = osd.get("param_alignment_paddings")
    ok = paddings is None or (isinstance(paddings, list) and all(
        isinstance(p, list) and all(_is_count(n) for n in p) for p in paddings
    ))
    _check_field(ok, path, "optimizer_state_dict.param_alignment_paddings", "a list of lists of integers", paddings)


# ---------------------------------------------------------------------------------------------
# Directory layout


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    """A save directory with ``latest``, or a tag directory with DeepSpeed ``*_states.pt`` files."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, LATEST)):
        return True
    return any(_ANY_STATES.fullmatch(name) for name in os.listdir(path))


def resolve_tag_dir(path: str | os.PathLike, tag: Optional[str] = None) -> str:
    """The directory holding the ``*_states.pt`` files: ``path/<tag>`` (``tag`` given, or
    read from ``path/latest``), or ``path`` itself when it holds them."""
    path = os.fspath(path)
    if tag is None and not os.path.isfile(os.path.join(path, LATEST)):
        if os.path.isdir(path) and any(_ANY_STATES.fullmatch(n) for n in os.listdir(path)):
            return path
        raise DeepSpeedCheckpointError(
            f"{path} is not a DeepSpeed checkpoint: it has neither a '{LATEST}' file nor *_model_states.pt files."
        )
    if tag is None:
        with open(os.path.join(path, LATEST)) as f:
            tag = f.read().strip()
        if not is_plain_file_name(tag):
            raise DeepSpeedCheckpointError(
                f"{path}/{LATEST} names {tag!r}, which is not a tag directory inside {path} (no directories, no '..', "
                "no absolute paths): the file is corrupt or was edited; pass --tag."
            )
    tag_dir = os.path.join(path, tag)
    if not os.path.isdir(tag_dir):
        raise DeepSpeedCheckpointError(
            f"{path}/{LATEST} names checkpoint {tag!r}, but {tag_dir} does not exist (deleted or not yet written)."
        )
    return tag_dir


# ---------------------------------------------------------------------------------------------
# Where each parameter lives


@dataclasses.dataclass(frozen=True)
class _Slice:
    """Elements [start, stop) of rank ``rank``'s flat fp32 vector of group ``group``."""

    rank: int
    group: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class ParamLocation:
    name: str
    shape: torch.Size
    slices: tuple[_Slice, ...]


class DeepSpeedCheckpoint:
    """The trainable parameters of one DeepSpeed ZeRO checkpoint, by name.

    ``checkpoint[name]`` / :meth:`tensor` assemble one fp32 master tensor; ``shapes`` gives
    every trainable parameter's shape without reading data; ``module_state`` is the module
    state dict of rank 0's model-states file (stage 1/2: the working-precision weights)."""

    def __init__(self, path: str | os.PathLike, tag: Optional[str] = None) -> None:
        self.dir = resolve_tag_dir(path, tag)
        model_file = self._model_states_file()
        states = safe_load(model_file)
        if not isinstance(states, dict) or "param_shapes" not in states:
            raise DeepSpeedCheckpointError(f"{model_file} is not a DeepSpeed model-states file (no 'param_shapes').")
        _check_model_states(states, model_file)
        self._check_parallelism(states, model_file)
        self.ds_version = states.get("ds_version")
        self.module_state: dict[str, torch.Tensor] = states.get("module") or {}
        self.frozen_names: list[str] = list((states.get("frozen_param_shapes") or {}).keys())
        groups = states["param_shapes"]
        self.world_size = states.get("dp_world_size") or self._count_optim_files()
        self._optim = [self._load_optim(rank) for rank in range(self.world_size)]
        self.stage = self._stage()
        self._flat = [self._flat_groups(rank) for rank in range(self.world_size)]
        self._locations = (self._locate_z12 if self.stage <= 2 else self._locate_z3)(groups)
        self.shapes = {name: loc.shape for name, loc in self._locations.items()}

    # --- files ---------------------------------------------------------------------------

    def _model_states_file(self) -> str:
        for name in (_MODEL_Z12, _MODEL_Z3.format(0)):
            if os.path.isfile(os.path.join(self.dir, name)):
                return os.path.join(self.dir, name)
        found = sorted(n for n in os.listdir(self.dir) if n.endswith(".pt"))
        raise DeepSpeedCheckpointError(
            f"{self.dir} has no model-states file ({_MODEL_Z12} for ZeRO-1/2, {_MODEL_Z3.format(0)} for ZeRO-3); "
            f"found {found or 'no .pt files'}. Is this a complete DeepSpeed checkpoint?"
        )

    def _check_parallelism(self, states: dict, model_file: str) -> None:
        mp = int(states.get("mp_world_size") or 1)
        pp = int((states.get("checkpoint_parallel_dimensions") or {}).get("pp_degree") or 1)
        if mp != 1 or pp != 1:
            raise DeepSpeedCheckpointError(
                f"{model_file}: model-parallel size {mp}, pipeline size {pp}. Offline consolidation reads "
                "data-parallel ZeRO checkpoints of an unsharded model (mp_rank_00 only); for megatron TP models "
                "save a dist_lora sharded checkpoint (dist_lora.checkpoint.sharded.save_sharded) and consolidate that."
            )

    def _count_optim_files(self) -> int:
        return sum(1 for n in os.listdir(self.dir) if re.fullmatch(r"zero_pp_rank_\d+_mp_rank_00_optim_states\.pt", n))

    def _load_optim(self, rank: int) -> dict:
        path = os.path.join(self.dir, _OPTIM.format(rank))
        if not os.path.isfile(path):
            raise DeepSpeedCheckpointError(
                f"checkpoint {self.dir} is incomplete: {_OPTIM.format(rank)} (data-parallel rank {rank} of "
                f"{self.world_size}) is missing; it holds that rank's partition of the fp32 weights. Copy it "
                "from the node that wrote it, or use an earlier complete checkpoint."
            )
        state = safe_load(path)
        osd = state.get("optimizer_state_dict") if isinstance(state, dict) else None
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise DeepSpeedCheckpointError(
                f"{path} is not a ZeRO optimizer-states file (no optimizer_state_dict.zero_stage); ZeRO stage 0 "
                "checkpoints are not supported: their weights are in the model states, load them with DeepSpeed."
            )
        _check_optim_states(osd, path)
        return osd

    def _stage(self) -> int:
        stages = {int(osd["zero_stage"]) for osd in self._optim}
        counts = {max(c) if isinstance(c, list) else int(c) for c in (osd.get("partition_count") for osd in self._optim)}
        if len(stages) != 1 or counts != {self.world_size}:
            raise DeepSpeedCheckpointError(
                f"{self.dir}: the optimizer files disagree (ZeRO stages {sorted(stages)}, partition counts "
                f"{sorted(counts)}, expected {self.world_size} ranks): files from different runs are mixed."
            )
        (stage,) = stages
        if stage not in (1, 2, 3):
            raise DeepSpeedCheckpointError(f"{self.dir}: unsupported ZeRO stage {stage}.")
        return stage

    def _flat_groups(self, rank: int) -> list[torch.Tensor]:
        key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
        flat = self._optim[rank].get(key)
        if not isinstance(flat, list) or not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in flat):
            raise DeepSpeedCheckpointError(f"{self.dir}/{_OPTIM.format(rank)}: no {key} (a list of flat tensors).")
        return flat

    # --- layout --------------------------------------------------------------------------

    def _locate_z12(self, groups: list[dict]) -> dict[str, ParamLocation]:
        """Stage 1/2: group vector = cat over ranks of each rank's piece (see module docstring)."""
        if any(len(flat) != len(groups) for flat in self._flat):
            raise DeepSpeedCheckpointError(
                f"{self.dir}: the optimizer files hold a different number of parameter groups than param_shapes."
            )
        paddings = self._optim[0].get("param_alignment_paddings")
        if paddings and [len(p) for p in paddings] != [len(shapes) for shapes in groups]:
            raise DeepSpeedCheckpointError(
                f"{self.dir}/{_OPTIM.format(0)}: param_alignment_paddings has {[len(p) for p in paddings]} entries per "
                f"group, param_shapes {[len(shapes) for shapes in groups]}: the files do not belong together."
            )
        out = {}
        for g, shapes in enumerate(groups):
            bounds, start = [], 0  # (rank, start, stop) of each rank's piece in the group vector
            for rank in range(self.world_size):
                n = self._flat[rank][g].numel()
                bounds.append((rank, start, start + n))
                start += n
            total, offset = start, 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                slices = tuple(
                    _Slice(rank, g, max(offset, a) - a, min(offset + numel, b) - a)
                    for rank, a, b in bounds
                    if a < offset + numel and offset < b
                )
                out[name] = ParamLocation(name, torch.Size(shape), slices)
                offset += numel + (int(paddings[g][i]) if paddings else 0)
            align = 2 * self.world_size
            if math.ceil(offset / align) * align != math.ceil(total / align) * align:
                raise DeepSpeedCheckpointError(
                    f"{self.dir}: parameter group {g} needs {offset} elements, the partitions hold {total}: the "
                    "model-states and optimizer files do not belong together (or the layout is not ZeRO-1/2's)."
                )
        return out

    def _locate_z3(self, groups: list[dict]) -> dict[str, ParamLocation]:
        """Stage 3: each parameter split on its own, c = ceil(numel / W) per rank."""
        group_sizes = [[t.numel() for t in flat] for flat in self._flat]
        if any(sizes != group_sizes[0] for sizes in group_sizes):
            raise DeepSpeedCheckpointError(f"{self.dir}: the ZeRO-3 partitions of the ranks differ in size (mixed runs?).")
        starts = [0]
        for n in group_sizes[0]:
            starts.append(starts[-1] + n)
        out, offset = {}, 0
        for shapes in groups:
            for name, shape in shapes.items():
                numel = math.prod(shape)
                chunk = math.ceil(numel / self.world_size)
                slices = []
                for rank in range(self.world_size):
                    for g in range(len(starts) - 1):  # the chunk may cross a group boundary
                        a, b = max(offset, starts[g]), min(offset + chunk, starts[g + 1])
                        if a < b:
                            slices.append(_Slice(rank, g, a - starts[g], b - starts[g]))
                out[name] = ParamLocation(name, torch.Size(shape), tuple(slices))
                offset += chunk
        if offset != starts[-1]:
            raise DeepSpeedCheckpointError(
                f"{self.dir}: the parameters need {offset} elements per rank, the ZeRO-3 partitions hold "
                f"{starts[-1]}: the model-states and optimizer files do not belong together."
            )
        return out

    # --- data ----------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self._locations

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        """The full fp32 master value of trainable parameter ``name`` (a new tensor)."""
        loc = self._locations[name]
        parts = [self._flat[s.rank][s.group][s.start : s.stop] for s in loc.slices]
        flat = torch.cat(parts) if parts else torch.empty(0)
        numel = loc.shape.numel()
        if flat.numel() < numel:
            raise DeepSpeedCheckpointError(
                f"{self.dir}: {name} has only {flat.numel()} of {numel} elements in the partitions."
            )
        return flat[:numel].detach().reshape(loc.shape).clone()

    def check_against_module_state(self, names: list[str]) -> None:
        """The fp32 masters must equal the working weights saved with them (to the working
        dtype's precision), wherever the module state holds them whole (stage 1/2 always;
        stage 3 with ``stage3_gather_16bit_weights_on_model_save``); a mismatch means the files
        are from different steps or the layout was misread, never silently wrong output."""
        for name in names:
            saved = self.module_state.get(name)
            if saved is None or saved.numel() != self.shapes[name].numel():
                continue
            master = self.tensor(name)
            tol = 0.0 if saved.dtype == torch.float32 else 1e-2
            if not torch.allclose(master.to(saved.dtype).float(), saved.float().reshape(master.shape), rtol=tol, atol=tol):
                raise DeepSpeedCheckpointError(
                    f"{self.dir}: {name} in the optimizer partitions differs from the module weights saved with it: "
                    "the files do not belong to the same step, or the partition layout is not understood."
                )
