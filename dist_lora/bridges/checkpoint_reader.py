"""Lazy, sliced reading of a Hugging Face safetensors checkpoint.

A checkpoint directory holds either one ``model.safetensors`` or several shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``); where both
are present the single file is read, as transformers does; a path to one ``.safetensors``
file reads that file. The reader opens a shard only when one of its tensors is asked for and
reads only the requested slice (``safe_open(...).get_slice(name)[...]``), so a tensor-parallel
rank never materialises a tensor it does not hold a part of. ``bytes_read`` counts what was
returned, for tests and logs.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Sliced access to the tensors of a safetensors checkpoint directory (or file).

    Use as a context manager (or call :meth:`close`) to release the open shard files.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = os.fspath(path)
        if os.path.isfile(path):  # one safetensors file
            self.directory, single = os.path.dirname(path), os.path.basename(path)
        else:
            self.directory, single = path, SINGLE_FILE
        index_path = os.path.join(self.directory, INDEX_FILE)
        single_path = os.path.join(self.directory, single)
        if os.path.isfile(single_path):
            with safe_open(single_path, framework="pt") as f:
                self._file_of: dict[str, str] = {name: single for name in f.keys()}
        elif os.path.isfile(index_path):
            self._file_of = self._read_index(index_path)
        else:
            raise FileNotFoundError(
                f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                "(save the model with save_pretrained(..., safe_serialization=True))."
            )
        self._handles: dict[str, Any] = {}
        self.bytes_read = 0

    def _read_index(self, index_path: str) -> dict[str, str]:
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map'.")
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(self.directory, f))})
        if missing:
            raise FileNotFoundError(f"{index_path} lists shard files that are missing: {missing}")
        return dict(weight_map)

    # -- access ---------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape (from the header; no data is read)."""
        return tuple(self.tensor_slice(name).get_shape())

    def tensor_slice(self, name: str) -> Any:
        """safetensors' lazy slice of tensor ``name`` (``get_shape()``, ``get_dtype()``,
        ``[index]``), opening its shard file on first use."""
        file = self._file_of.get(name)
        if file is None:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.directory}.")
        handle = self._handles.get(file)
        if handle is None:
            handle = safe_open(os.path.join(self.directory, file), framework="pt").__enter__()
            self._handles[file] = handle
        return handle.get_slice(name)

    def read(self, name: str, *index: slice) -> torch.Tensor:
        """``tensor[index]`` of checkpoint tensor ``name``, reading only that part from disk.

        ``index`` holds one ``slice`` per leading dimension (none: the whole tensor).
        """
        part = self.tensor_slice(name)
        tensor = part[index] if index else part[:]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
