"""Write a released adapter: a :class:`Plan` streamed from its source into a staged directory.

The output header is computed from the plan (names, dtypes, shapes); then each source tensor
is read once (:meth:`.sources.AdapterSource.reading`) and the one or more output tensors cut
from it (row ranges, no copies) are appended
(:class:`~dist_lora.checkpoint.safetensors_stream.StreamWriter`). Peak memory is about one
source tensor plus one shard piece, independent of the adapter's size. A tensor with NaN/Inf
values stops the release unless allowed. The directory is built under a temporary name next to
``out_dir`` and renamed into place at the end (:class:`dist_lora.io.AtomicDirectory`), so on
any error ``out_dir`` is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterator, Optional, Union

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..checkpoint.peft_format import WEIGHTS_NAME
from ..checkpoint.safetensors_stream import DTYPES, StreamWriter
from ..config import LoraConfig
from ..io import AtomicDirectory, DirectoryNotEmptyError, paths_overlap
from .errors import ConsolidationError
from .sources import AdapterSource, Source


@dataclasses.dataclass
class Output:
    """A tensor of the written file: ``runs`` of rows of its source (None: the whole source);
    ``parameter``: for an adapter on a parameter (PEFT's target_parameters), its full HF name."""

    name: str
    shape: tuple[int, ...]
    runs: Optional[list[tuple[int, int]]]  # rows of the source, None: the whole tensor
    parameter: Optional[str] = None


@dataclasses.dataclass
class Stacked:
    """An output tensor computed in memory from several checkpoint tensors ``parts`` (read once
    each, in order): ``combine(tensors)``. Has a Source's ``key`` / ``dtype`` / ``global_shape``
    for the writer's checks and messages."""

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    parts: list[Source]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]

    def tensor(self, read: Callable[[Source], torch.Tensor]) -> torch.Tensor:
        """Read each part (copied: a reader may reuse its buffer) and combine them."""
        seen: dict[str, torch.Tensor] = {}
        for part in self.parts:
            if part.key not in seen:
                seen[part.key] = read(part).clone()
        return self.combine([seen[p.key] for p in self.parts])


Group = tuple[Union[Source, Stacked], list[Output]]


def read_group_source(read: Callable[[Source], torch.Tensor], source: Union[Source, Stacked]) -> torch.Tensor:
    """A group's source tensor: read from the checkpoint, or computed from its parts."""
    return source.tensor(read) if isinstance(source, Stacked) else read(source)


@dataclasses.dataclass
class Plan:
    """What a release writes: each source's output tensors, and the adapter_config.json."""

    groups: list[Group]
    config: LoraConfig

    def output_names(self) -> list[str]:
        return [out.name for _, outs in self.groups for out in outs]


def check_out_dir(out_dir: str, overwrite: bool, checkpoint_dir: str) -> None:
    """Refuse an output directory that is, contains or lies inside the checkpoint, is not a
    directory, or (without ``overwrite``) is not empty."""
    if paths_overlap(out_dir, checkpoint_dir):
        raise ConsolidationError(
            f"the output directory {out_dir} must not be, contain or lie inside the checkpoint {checkpoint_dir}."
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConsolidationError(f"{out_dir} exists and is not a directory.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConsolidationError(f"{out_dir} is not empty; pass --overwrite (overwrite=True) to replace its contents.")


@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool) -> Iterator[str]:
    """A staging directory next to ``out_dir``, renamed to ``out_dir`` on success and removed on
    failure, ``out_dir`` untouched (:class:`dist_lora.io.AtomicDirectory`); an ``out_dir`` that
    became non-empty meanwhile is not replaced without ``overwrite`` (a ConsolidationError)."""
    try:
        with AtomicDirectory(out_dir, overwrite) as staging:
            yield staging
    except DirectoryNotEmptyError as e:
        raise ConsolidationError(str(e)) from None


def write_release(
    source: AdapterSource,
    plan: Plan,
    out_dir: str,
    overwrite: bool,
    show_progress: bool = True,
    allow_nonfinite: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Write ``plan`` (tensors read from ``source``) as ``adapter_model.safetensors`` +
    ``adapter_config.json`` into ``out_dir``, staged; return ``out_dir``. ``dtype``: the
    released floating-point dtype (default: as stored, fp32)."""
    with staged_output(out_dir, overwrite) as staging:
        write_adapter_file(os.path.join(staging, WEIGHTS_NAME), plan.groups, source, show_progress, allow_nonfinite, dtype)
        plan.config.save_pretrained(staging)
    return out_dir


def released_dtype(stored: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    """A tensor's dtype in the release: ``dtype`` for floating-point tensors when given."""
    return dtype if dtype is not None and stored.is_floating_point else stored


def write_adapter_file(
    path: str, groups: list[Group], source: AdapterSource, show_progress: bool, allow_nonfinite: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """Stream every group's outputs into one safetensors file, the widest dtypes first (which
    keeps every tensor's data aligned). Each source tensor is read once from ``source`` (a
    :class:`Stacked` one built from its parts) and cast to the released dtype; one with NaN/Inf
    values (also after that cast: fp16 overflows above 65504) is refused unless
    ``allow_nonfinite``."""
    groups = sorted(groups, key=lambda group: -released_dtype(group[0].dtype, dtype).itemsize)
    specs = [(out.name, released_dtype(src.dtype, dtype), out.shape) for src, outs in groups for out in outs]
    bar = tqdm(total=len(specs), unit="tensor", desc="consolidating", disable=not show_progress)
    try:
        with source.reading() as read, StreamWriter(path, specs, metadata={"format": "pt"}) as writer:
            for src, outputs in groups:
                tensor = read_group_source(read, src).to(released_dtype(src.dtype, dtype))
                if not allow_nonfinite:
                    check_finite(src.key, tensor, source.where)
                for out in outputs:
                    writer.write(out.name, *output_chunks(tensor, out))
                    bar.update(1)
                del tensor
    finally:
        bar.close()
    _verify_written(path, specs)


def output_chunks(tensor: torch.Tensor, out: Output) -> list[torch.Tensor]:
    """The row ranges of the source ``tensor`` that make up ``out``, in order (views)."""
    return [tensor] if out.runs is None else [tensor[a:b] for a, b in out.runs]


def check_finite(key: str, tensor: torch.Tensor, where: str) -> None:
    """Refuse (a ConsolidationError naming ``key`` in ``where``) a tensor with NaN/Inf values."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        raise ConsolidationError(
            f"{key} in {where} has {bad} NaN/Inf values (of {tensor.numel()}): the run diverged or the "
            "checkpoint is damaged. Release an earlier checkpoint, or pass --allow-nonfinite (allow_nonfinite=True) "
            "to write it anyway."
        )


def _verify_written(path: str, specs: list) -> None:
    """Re-read the written header with the safetensors library itself."""
    with safe_open(path, framework="pt") as f:
        if f.metadata() != {"format": "pt"} or set(f.keys()) != {name for name, _, _ in specs}:
            raise ConsolidationError(f"{path}: the written file does not read back as written.")  # pragma: no cover
        for name, dtype, shape in specs:
            part = f.get_slice(name)
            if tuple(part.get_shape()) != tuple(shape) or DTYPES[part.get_dtype()] != dtype:
                raise ConsolidationError(  # pragma: no cover
                    f"{path}: {name} reads back as {part.get_dtype()} {part.get_shape()}."
                )
