"""A DCP checkpoint of an FSDP2 run as a release source (``dist-lora consolidate``).

:func:`read_dcp` turns a step directory written by
:func:`dist_lora.fsdp.checkpoint.save_fsdp_checkpoint` (format
:mod:`dist_lora.checkpoint.dcp_format`) into the :class:`~.sources.AdapterSource` that
:func:`.consolidate.consolidate` feeds through the same stages as the other sources. One
process, no process group: DCP's shards are read with ``no_dist=True`` into full tensors (the
whole adapter, adapter-sized memory), the metadata by the safe reader.

Names: a DCP key is ``model.`` + the LoraModel's parameter name; the parameter name maps to a
PEFT key as for a DeepSpeed checkpoint (:func:`.deepspeed_source.adapter_names`: the wrapper
prefix dropped, the adapter name removed), e.g.
``model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
``model.layers.0.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch

from ..checkpoint.dcp_format import load_dcp_tensors, read_dcp_manifest
from ..checkpoint.manifest import read_adapter_config
from .deepspeed_source import adapter_names
from .errors import ConsolidationError, as_consolidation_error
from .hf_model import hf_modules
from .sources import AdapterSource, Read, Source

_STATE_PREFIX = "model."  # the DCP state dict's top-level key for the model's tensors


@dataclasses.dataclass
class DcpSource(AdapterSource):
    """The adapter tensors of a DCP checkpoint (fp32 masters) under PEFT-style keys."""

    dcp_keys: dict[str, str]  # key -> DCP key

    @contextlib.contextmanager
    def reading(self) -> Iterator[Read]:
        with as_consolidation_error():
            tensors = load_dcp_tensors(self.where, list(self.dcp_keys.values()))

        def read(source: Source) -> torch.Tensor:
            return tensors[self.dcp_keys[source.key]]

        yield read


def read_dcp(checkpoint_dir: str, verify: bool = True, hf_model_dir: Optional[str] = None) -> DcpSource:
    """The DCP checkpoint in ``checkpoint_dir``: its manifest (files present, sha256 with
    ``verify``), its adapter config, its adapter tensors named as PEFT names them."""
    with as_consolidation_error():
        manifest = read_dcp_manifest(checkpoint_dir, verify=verify)
        config = read_adapter_config(checkpoint_dir)
    shapes = {k.removeprefix(_STATE_PREFIX): shape for k, shape in manifest["tensors"].items()}
    if not shapes:
        raise ConsolidationError(f"checkpoint {checkpoint_dir} holds no tensors.")
    modules = set(hf_modules(hf_model_dir, config.layer_replication)) if hf_model_dir else None
    names = adapter_names(list(shapes), manifest["adapter_name"], checkpoint_dir, None, modules)
    tensors = {key: Source(key, tuple(shapes[name]), torch.float32, []) for name, key in names.items()}
    dcp_keys = {key: _STATE_PREFIX + name for name, key in names.items()}
    return DcpSource(config, tensors, checkpoint_dir, dcp_keys)
