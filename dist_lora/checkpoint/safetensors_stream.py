"""Read and write safetensors files one tensor at a time (bounded memory).

``safetensors.torch.save_file`` needs every tensor in memory at once. The format does not:
a file is ``<u64 little-endian N><N bytes of JSON header><data>``, the header giving each
tensor's ``dtype``, ``shape`` and ``data_offsets`` ([begin, end) bytes into the data). When the
names, dtypes and shapes are known up front, the header can be written first and each tensor's
bytes appended as it becomes available: :class:`StreamWriter`. The header is padded with
spaces to a multiple of 8 bytes (as the spec recommends) so the data starts aligned.

:class:`ShardReader` is the reading half: it validates a file's header against its size
and reads one tensor into a caller-provided buffer with plain file reads (no mmap: pages of
a memory-mapped file count towards the process's resident memory until it is unmapped).
Every problem is a :class:`SafetensorsFormatError` that names the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Optional, Sequence

import torch

# safetensors dtype codes <-> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers


class SafetensorsFormatError(ValueError):
    """A safetensors file is malformed or does not hold what it is expected to hold."""


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying (little-endian host)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


class StreamWriter:
    """Write a safetensors file whose tensors are declared up front and written in order.

    ``specs`` lists ``(name, dtype, shape)`` in file order; :meth:`write` takes the tensors in
    that order, each as one tensor or several contiguous chunks that concatenate (along dim 0)
    to it. Use as a context manager: leaving it with an exception leaves a partial file that
    the caller must discard (write into a staging directory); leaving it normally checks that
    every declared tensor was written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        metadata: Optional[dict[str, str]] = None,
    ) -> None:
        self.path = os.fspath(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        offset = 0
        for name, dtype, shape in specs:
            if name in header:
                raise ValueError(f"tensor name {name!r} is declared twice.")
            if dtype not in CODES:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors code.")
            shape = tuple(int(s) for s in shape)
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, shape, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        if len(text) > MAX_HEADER:
            raise ValueError(f"safetensors header of {len(text)} bytes exceeds the {MAX_HEADER}-byte limit.")
        self.data_bytes = offset
        self._next = 0
        self._file = open(self.path, "wb", buffering=0)  # unbuffered: large writes go straight to the OS
        self._write_all(memoryview(struct.pack("<Q", len(text)) + text))

    def _write_all(self, data: memoryview) -> None:
        offset = 0
        while offset < data.nbytes:  # a raw write may be partial
            offset += self._file.write(data[offset:])

    def write(self, name: str, *chunks: torch.Tensor) -> None:
        """Append tensor ``name`` (the next declared one) from one or more chunks."""
        if self._next >= len(self._order):
            raise ValueError(f"{name}: every declared tensor has been written already.")
        want, dtype, shape, size = self._order[self._next]
        if name != want:
            raise ValueError(f"tensors must be written in declared order: expected {want!r}, got {name!r}.")
        written = 0
        for chunk in chunks:
            if chunk.dtype != dtype or chunk.device.type != "cpu":
                raise ValueError(f"{name}: chunk is {chunk.dtype} on {chunk.device}, declared {dtype} on cpu.")
            if len(shape) > 1 and tuple(chunk.shape[1:]) != shape[1:]:
                raise ValueError(f"{name}: chunk of shape {tuple(chunk.shape)} does not fit declared shape {shape}.")
            data = _byte_view(chunk.contiguous())
            self._write_all(data)
            written += data.nbytes
        if written != size:
            raise ValueError(f"{name}: wrote {written} bytes, the declared {dtype} {shape} needs {size}.")
        self._next += 1

    def close(self, sync: bool = True) -> None:
        """Close the file; with ``sync`` (default) make its contents durable first (fsync)."""
        if not self._file.closed:
            if sync:
                os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(sync=exc_type is None)
        if exc_type is None and self._next != len(self._order):
            missing = [name for name, *_ in self._order[self._next :]]
            raise ValueError(f"{self.path}: {len(missing)} declared tensors were not written ({missing[:3]} ...).")


class ShardReader:
    """Validated header and plain-read access to the tensors of one safetensors file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self.tensors, self._data_start = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, why: str) -> SafetensorsFormatError:
        return SafetensorsFormatError(
            f"{self.path} is not a valid safetensors file: {why}. The file is corrupt or truncated; "
            "re-save it (or restore it from a copy)."
        )

    def _parse_header(self) -> tuple[dict[str, dict], int]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) != 8:
            raise self._fail(f"only {size} bytes, no header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER, size - 8):
            raise self._fail(f"header length {length} exceeds the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"the header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("the header is not a JSON object")
        header.pop("__metadata__", None)
        data_start, data_size = 8 + length, size - 8 - length
        spans = []
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = [int(s) for s in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"bad header entry for {name!r}: {info!r}") from None
            if any(s < 0 for s in shape) or end - begin != _nbytes(dtype, shape) or begin < 0:
                raise self._fail(f"{name!r}: data_offsets {[begin, end]} do not fit {info['dtype']} {shape}")
            if end > data_size:
                raise self._fail(f"{name!r} ends at byte {end} of a {data_size}-byte data section (truncated?)")
            header[name] = {"dtype": dtype, "shape": shape, "begin": data_start + begin, "nbytes": end - begin}
            spans.append((begin, end))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise self._fail("tensors overlap")
        return header, data_start

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor ``name`` into the contiguous tensor ``out`` (same dtype and numel)."""
        info = self.tensors.get(name)
        if info is None:
            raise self._fail(f"it has no tensor {name!r}")
        if out.dtype != info["dtype"] or out.numel() * out.element_size() != info["nbytes"] or not out.is_contiguous():
            raise ValueError(f"{self.path}:{name}: buffer {out.dtype} {tuple(out.shape)} does not fit {info}.")
        view = _byte_view(out)
        got = os.preadv(self._file.fileno(), [view], info["begin"]) if view.nbytes else 0
        if got != view.nbytes:
            raise self._fail(f"{name!r}: read {got} of {view.nbytes} bytes (truncated?)")
        return out

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise self._fail(f"it has no tensor {name!r}")
        return self.read_into(name, torch.empty(info["shape"], dtype=info["dtype"]))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def row_runs(indices: torch.Tensor) -> list[tuple[int, int]]:
    """Collapse a 1-D tensor of row indices into [start, end) runs of consecutive rows."""
    idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if idx.numel() == 0:
        return []
    breaks = (torch.nonzero(idx[1:] != idx[:-1] + 1).reshape(-1) + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, idx.numel()]
    values = idx.tolist()
    return [(values[a], values[b - 1] + 1) for a, b in zip(starts, ends)]
