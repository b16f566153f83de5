"""The tensors of a sharded checkpoint: pieces of global tensors in shard files.

Every tensor of a checkpoint is stored as pieces: a piece is the box ``[offsets, offsets +
shape)`` of the global (TP=1 layout) tensor, held under a file key in one shard file and
described by a manifest entry (:mod:`.manifest`). This module is the one home of both sides:

* writing: :func:`tp_boxes` (where a TP shard sits in its global tensor, from megatron's
  partition markers; a strided shard is several boxes) and :func:`shard_pieces` (the pieces
  and manifest entries of a local tensor);
* reading: :func:`index_tensors` (the pieces of each global tensor, checked against the shard
  files' headers), :func:`check_coverage` (each tensor covered exactly once, else the missing
  shard files are named) and :func:`assemble` (any box of a global tensor: a rank's slice for
  ``load_sharded``, the whole tensor for consolidation), with bounded memory: plain file reads
  (:class:`ShardFiles`) and one reusable buffer (:class:`Scratch`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, NamedTuple, Optional, Sequence

import torch

from ..config import ConfigError
from ..parallel.tp import partition_stride
from .manifest import ShardName, parse_shard_name, shard_file_name
from .safetensors_stream import SafetensorsFormatError, ShardReader


# ---------------------------------------------------------------------------------------------
# Writing: where a TP shard sits in its global tensor


class Box(NamedTuple):
    """A part of a local tensor: ``local[index]`` is the global tensor's
    ``[offsets, offsets + shape)``."""

    index: tuple[slice, ...]
    offsets: list[int]
    shape: list[int]


def tp_boxes(param: torch.Tensor, tp_rank: int, tp_size: int) -> tuple[list[int], list[Box]]:
    """Where a local tensor sits in its global (TP=1) tensor, from megatron's sharding markers:
    the global shape and one box per stride piece (stride s: a gated fc1 holds [gate_i; up_i],
    s boxes)."""
    shape = list(param.shape)
    everything = tuple(slice(None) for _ in shape)
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return shape, [Box(everything, [0] * len(shape), shape)]
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
        boxes.append(Box(tuple(index), offsets, box))
    return global_shape, boxes


def shard_pieces(
    key: str, tensor: torch.Tensor, placement: torch.Tensor, tp_rank: int, tp_size: int
) -> list[tuple[str, torch.Tensor, dict]]:
    """(file key, CPU tensor, manifest entry) for each box of ``tensor`` (global key ``key``),
    placed like the parameter ``placement``: the file key is ``key``, or ``key@k`` for the
    k-th box of a strided shard."""
    global_shape, boxes = tp_boxes(placement, tp_rank, tp_size)
    dtype = str(tensor.dtype).removeprefix("torch.")
    pieces = []
    for k, (index, offsets, shape) in enumerate(boxes):
        entry = {"key": key, "global_shape": global_shape, "offsets": offsets, "shape": shape, "dtype": dtype}
        pieces.append((key if len(boxes) == 1 else f"{key}@{k}", tensor.detach()[index].contiguous().cpu(), entry))
    return pieces


# ---------------------------------------------------------------------------------------------
# Reading: the pieces of each global tensor, and putting them together


@dataclasses.dataclass
class Piece:
    """``file[file_key]`` is the global tensor's ``[offsets, offsets + shape)``."""

    file: str
    file_key: str
    offsets: list[int]
    shape: list[int]


@dataclasses.dataclass
class StoredTensor:
    """One global (TP=1 layout) tensor of a checkpoint and the pieces it is stored in."""

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[Piece]


def _read_headers(directory: str, files: Iterable[str]) -> dict[str, dict]:
    headers = {}
    for name in files:
        try:
            with ShardReader(os.path.join(directory, name)) as reader:
                headers[name] = reader.tensors
        except SafetensorsFormatError as e:
            raise ConfigError(str(e)) from None
    return headers


def index_tensors(directory: str | os.PathLike, files: dict[str, dict]) -> dict[str, StoredTensor]:
    """Global tensors by key from the shard records ``files`` of a checked manifest (its
    ``files``, or ``optimizer.files``), each entry checked against the file's header (the
    tensor is there, with the manifest's dtype and shape) and the pieces of a tensor against
    each other (same global shape and dtype). Coverage: :func:`check_coverage`."""
    directory = os.fspath(directory)
    headers = _read_headers(directory, files)
    tensors: dict[str, StoredTensor] = {}
    for name, info in sorted(files.items()):
        for file_key, entry in sorted(info["tensors"].items()):  # entries are schema-checked
            where = f"{name}:{file_key}"
            key, global_shape, dtype = entry["key"], tuple(entry["global_shape"]), getattr(torch, entry["dtype"])
            piece = Piece(name, file_key, list(entry["offsets"]), list(entry["shape"]))
            stored = headers[name].get(file_key)
            if stored is None:
                raise ConfigError(f"{where}: listed in the manifest but not in the file (corrupt shard?).")
            if stored["dtype"] != dtype or stored["shape"] != piece.shape:
                raise ConfigError(
                    f"{where}: the manifest says {entry['dtype']} {piece.shape}, the file holds "
                    f"{stored['dtype']} {stored['shape']}."
                )
            tensor = tensors.setdefault(key, StoredTensor(key, global_shape, dtype, []))
            if (tensor.global_shape, tensor.dtype) != (global_shape, dtype):
                raise ConfigError(f"{key}: its pieces disagree on the global shape or dtype.")
            tensor.pieces.append(piece)
    return tensors


def check_coverage(tensor: StoredTensor, tp_size: int) -> None:
    """The pieces of ``tensor`` cover it exactly once (no overlap, nothing missing); an
    incomplete tensor's error names the shard files (and ranks) that hold no piece of it
    (``tp_size``: the TP size it was saved at; the expert-TP size for an expert tensor)."""
    boxes = [(p.offsets, p.shape) for p in tensor.pieces]
    for i, (o1, s1) in enumerate(boxes):
        for o2, s2 in boxes[i + 1 :]:
            if all(a < b + m and b < a + n for a, n, b, m in zip(o1, s1, o2, s2)):
                raise ConfigError(f"{tensor.key}: two pieces of it overlap (a corrupt manifest).")
    covered = sum(torch.Size(s).numel() for _, s in boxes)
    total = torch.Size(tensor.global_shape).numel()
    if covered == total:
        return
    found = [shard for p in tensor.pieces if (shard := parse_shard_name(p.file)) is not None]
    kind, ranks = (found[0].kind if found else "shard"), {(s.pp, s.tp, s.ep) for s in found}
    missing = [
        f"{shard_file_name(kind, pp, tp, ep)} ({ShardName(kind, pp, tp, ep).describe()})"
        for pp, ep in sorted({(pp, ep) for pp, _, ep in ranks}, key=str)
        for tp in range(tp_size)
        if (pp, tp, ep) not in ranks
    ]
    raise ConfigError(
        f"tensor {tensor.key} is incomplete: its pieces cover {covered} of {total} values"
        + (f"; no piece from {', '.join(missing)}" if missing else "")
        + " (a rank's shard is missing from the checkpoint)."
    )


class ShardFiles:
    """The shard files of a checkpoint directory, opened on demand (a bounded number at a
    time) and read with plain file reads (:class:`.safetensors_stream.ShardReader`)."""

    LIMIT = 64

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        self._open: dict[str, ShardReader] = {}

    def _reader(self, name: str) -> ShardReader:
        reader = self._open.pop(name, None)
        if reader is None:
            if len(self._open) >= self.LIMIT:
                self._open.pop(next(iter(self._open))).close()  # the least recently used
            reader = ShardReader(os.path.join(self.directory, name))
        self._open[name] = reader  # most recently used last
        return reader

    def read_into(self, piece: Piece, out: torch.Tensor) -> torch.Tensor:
        """Read ``piece`` into the contiguous tensor ``out`` (its dtype and size)."""
        try:
            return self._reader(piece.file).read_into(piece.file_key, out)
        except SafetensorsFormatError as e:
            raise ConfigError(str(e)) from None

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()

    def __enter__(self) -> "ShardFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Scratch:
    """One reusable byte buffer handed out as tensors of any dtype and shape: every tensor is
    assembled in the same memory (fresh allocations would page-fault on every tensor)."""

    def __init__(self, nbytes: int = 0) -> None:
        self._buffer = torch.empty(nbytes, dtype=torch.uint8)

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if nbytes > self._buffer.numel():
            self._buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes].view(dtype).view(tuple(shape))


def assemble(
    tensor: StoredTensor,
    files: ShardFiles,
    out: torch.Tensor,
    offsets: Optional[Sequence[int]] = None,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """Fill ``out`` with the box ``[offsets, offsets + out.shape)`` of ``tensor`` (default: the
    whole tensor) from its pieces, whose coverage :func:`check_coverage` has checked. A piece
    that lies wholly in the box where ``out`` is contiguous (whole rows) is read straight into
    place; others are read into ``scratch`` and their overlap with the box copied."""
    offsets = [0] * out.dim() if offsets is None else list(offsets)
    scratch = Scratch() if scratch is None else scratch
    for piece in tensor.pieces:
        lo = [max(a, b) for a, b in zip(offsets, piece.offsets)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, out.shape, piece.offsets, piece.shape)]
        if any(low >= high for low, high in zip(lo, hi)):
            continue
        target = out[tuple(slice(low - o, high - o) for low, high, o in zip(lo, hi, offsets))]
        if lo == piece.offsets and list(target.shape) == piece.shape and target.is_contiguous():
            files.read_into(piece, target)
        else:
            buffer = files.read_into(piece, scratch.tensor(piece.shape, tensor.dtype))
            target.copy_(buffer[tuple(slice(low - p, high - p) for low, high, p in zip(lo, hi, piece.offsets))])
    return out
