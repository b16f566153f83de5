"""What a release reads: an adapter checkpoint as :class:`Source` tensors.

Every release starts from an :class:`AdapterSource`: the LoraConfig the adapter was trained
with, its global (TP=1 layout) tensors by key (``<module>.lora_A.weight``, ...: one
:class:`Source` each, no data read yet) and :meth:`AdapterSource.reading`, which reads one
tensor at a time. The stages after it (:mod:`.checks`, :mod:`.peft`, :mod:`.write`) see only
this form, whatever the checkpoint was:

* a dist_lora sharded checkpoint (:func:`read_sharded`, here): tensors assembled from their
  shard pieces (:mod:`dist_lora.checkpoint.pieces`) with plain file reads and one reused
  buffer;
* a DeepSpeed ZeRO checkpoint (:func:`.deepspeed_source.read_deepspeed`): each tensor cut from
  the fp32 optimizer partitions.

A sharded checkpoint may be given by a training run's checkpoint root
(:func:`resolve_checkpoint_dir`: its ``latest`` checkpoint).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
from typing import Callable, Iterator

import torch

from ..checkpoint.manifest import MANIFEST, read_adapter_config, read_manifest
from ..checkpoint.pieces import Scratch, ShardFiles, StoredTensor, assemble, check_coverage, index_tensors
from ..checkpoint.training import complete_checkpoints, latest_checkpoint
from ..config import ConfigError, LoraConfig
from ..layers.base import LoraLayer
from ..layers.embedding import FACTOR_KEYS as EMBEDDING_FACTOR_KEYS
from .errors import ConsolidationError, as_consolidation_error

LINEAR_SUFFIXES = (*LoraLayer.factor_keys, "lora_B.bias")  # a linear layer's LoRA tensors (DoRA aside)
LORA_SUFFIXES = (*LINEAR_SUFFIXES, "lora_magnitude_vector", *EMBEDDING_FACTOR_KEYS)
A_SUFFIXES = (LoraLayer.factor_keys[0], EMBEDDING_FACTOR_KEYS[0])  # A [r, in] of a linear layer / an embedding

Read = Callable[["Source"], torch.Tensor]


def split_key(key: str) -> tuple[str, str]:
    """(module, tensor suffix): ``a.b.lora_A.weight`` -> (``a.b``, ``lora_A.weight``); a
    modules_to_save tensor ``a.b.weight`` -> (``a.b``, ``weight``)."""
    for suffix in LORA_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    module, _, param = key.rpartition(".")
    return module, param


class Source(StoredTensor):
    """One global (TP=1 layout) tensor of the checkpoint, seen as a module's tensor
    (:class:`~dist_lora.checkpoint.pieces.StoredTensor`: its pieces; none for a source that is
    not a sharded checkpoint)."""

    @property
    def module(self) -> str:
        return split_key(self.key)[0]

    @property
    def suffix(self) -> str:
        return split_key(self.key)[1]


@dataclasses.dataclass
class AdapterSource(abc.ABC):
    """An adapter checkpoint to release: its config, its tensors by key, where it is (for
    messages). :meth:`reading` yields the function that reads a :class:`Source`'s tensor."""

    config: LoraConfig
    tensors: dict[str, Source]
    where: str

    @abc.abstractmethod
    def reading(self) -> contextlib.AbstractContextManager[Read]:
        """A context in which the returned function reads a source's tensor."""


# ---------------------------------------------------------------------------------------------
# A dist_lora sharded checkpoint


@dataclasses.dataclass
class ShardedSource(AdapterSource):
    """A sharded checkpoint (:func:`dist_lora.checkpoint.sharded.save_sharded`, any TP × PP)."""

    @contextlib.contextmanager
    def reading(self) -> Iterator[Read]:
        """Each tensor assembled from its shard pieces into one reused buffer (valid until the
        next read), the shard files opened on demand."""
        largest = max(torch.Size(s.global_shape).numel() * s.dtype.itemsize for s in self.tensors.values())
        whole, pieces = Scratch(largest), Scratch()
        with ShardFiles(self.where) as files:

            def read(source: Source) -> torch.Tensor:
                with as_consolidation_error():
                    return assemble(source, files, whole.tensor(source.global_shape, source.dtype), None, pieces)

            yield read


def read_sharded(directory: str, verify: bool = True) -> ShardedSource:
    """The sharded checkpoint in ``directory``: its manifest checked
    (:func:`~dist_lora.checkpoint.manifest.read_manifest`: schema, plain file names, every
    adapter shard and adapter_config.json present and, with ``verify``, their sha256; optimizer
    and RNG files are neither read nor needed), every tensor's pieces checked against the shard
    headers and to cover it exactly once."""
    with as_consolidation_error():
        manifest = read_manifest(directory, verify=verify, parts=("adapter",))
        config = sharded_config(directory)
        stored = index_tensors(directory, manifest["files"])
        for tensor in stored.values():
            check_coverage(tensor, manifest["layout"]["tp"])
    if not stored:
        raise ConsolidationError(f"checkpoint {directory} holds no tensors.")
    tensors = {key: Source(t.key, t.global_shape, t.dtype, t.pieces) for key, t in stored.items()}
    return ShardedSource(config, tensors, directory)


def sharded_config(directory: str) -> LoraConfig:
    """The LoraConfig of the sharded checkpoint in ``directory`` (its adapter_config.json)."""
    with as_consolidation_error():
        return read_adapter_config(directory)


def is_training_root(path: str | os.PathLike) -> bool:
    """A training run's checkpoint root (``<train.out_dir>/checkpoints``: ``step_N`` checkpoint
    directories and a ``latest`` pointer), not a checkpoint itself."""
    path = os.fspath(path)
    return not os.path.isfile(os.path.join(path, MANIFEST)) and bool(complete_checkpoints(path))


def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
    """The sharded checkpoint to read for ``path``: the checkpoint that a training run's root
    points to with ``latest`` (:func:`is_training_root`), else ``path`` itself."""
    path = os.fspath(path)
    if not is_training_root(path):
        return path
    try:
        found = latest_checkpoint(path)
    except ConfigError as e:
        raise ConsolidationError(f"{e} Pass one of its step_N checkpoint directories instead.") from None
    if found is None:  # pragma: no cover  (a root has a complete checkpoint)
        raise ConsolidationError(f"{path} holds no complete checkpoint: pass a step_N checkpoint directory.")
    return found
