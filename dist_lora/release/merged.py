"""Export a sharded adapter checkpoint merged into its Hugging Face base model.

    dist-lora merge CHECKPOINT --hf-model HF_DIR OUT_DIR

writes an HF checkpoint (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``,
or one ``model.safetensors`` when it fits one shard; ``config.json`` and any generation /
tokenizer files copied) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads as
the merged model.

How, with bounded memory:
  1. :func:`dist_lora.release.consolidate.consolidate` writes the PEFT adapter (HF module
     names, fused QKV / gated fc1 split with the bridge's layouts) into a temporary directory
     next to OUT_DIR (removed at the end). An adapter is small next to the base model.
  2. The base checkpoint is streamed one tensor at a time: for a targeted module
     W' = W + s·B·A (DoRA: rescaled per row; with lora_bias: b' = b + s·b_B) in fp32, cast back
     to W's dtype (:func:`dist_lora.layers.math.merged_weight`, the formula every merge uses);
     a modules_to_save tensor replaces the base tensor; anything else is copied unchanged.
     At most one base tensor (plus its fp32 copy) and one module's factors are in memory.
  2b. Fused expert / router parameters (PEFT ``target_parameters``, a mixture of experts) merge
     per expert into either base layout (:mod:`dist_lora.release.merged_experts`).
  3. With ``layer_replication`` the output is the dense expanded model
     (:mod:`dist_lora.release.merged_layers`): layer j is base layer source[j] with layer j's
     adapter merged, and ``config.json`` counts the expanded layers.
  4. Files go into a staging directory that is renamed to OUT_DIR at the end (as consolidate).
Every adapter tensor must land on a base tensor, or the export fails (nothing is dropped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..bridges import CheckpointReader
from ..checkpoint.peft_format import PREFIX, WEIGHTS_NAME
from ..checkpoint.safetensors_stream import DTYPES, SafetensorsFormatError, ShardReader, StreamWriter
from ..config import LoraConfig
from ..io import paths_overlap
from ..layers import math as lm
from .consolidate import consolidate
from .errors import ConsolidationError
from .merged_experts import ParameterDeltas
from .merged_layers import LayerExpansion, layer_expansion
from .sources import LORA_SUFFIXES, split_key
from .write import check_out_dir, staged_output

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MergedExportError(ConsolidationError):
    """The merged export cannot be written; the message says why."""


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"200MB"``, ``"64KiB"`` (HF's convention)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not match or match.group(2) not in _UNITS:
            raise MergedExportError(f"cannot read the size {size!r} (examples: 5GB, 500MB, 1048576).")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise MergedExportError(f"the maximum shard size must be positive, got {size!r}.")
    return value


def merge_export(
    checkpoint_dir: str | os.PathLike,
    hf_model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    show_progress: bool = True,
    allow_nonfinite: bool = False,
) -> str:
    """Write the base model in ``hf_model_dir`` with the adapter of the sharded checkpoint
    ``checkpoint_dir`` merged into it, as an HF safetensors checkpoint in ``out_dir``; return
    ``out_dir``. A non-empty ``out_dir`` is refused unless ``overwrite``; an adapter tensor with
    NaN/Inf values unless ``allow_nonfinite``; a base safetensors file that is truncated or
    corrupt always (the error names it)."""
    checkpoint_dir, hf_model_dir, out_dir = map(os.fspath, (checkpoint_dir, hf_model_dir, out_dir))
    limit = parse_size(max_shard_size)
    check_out_dir(out_dir, overwrite, checkpoint_dir)
    if paths_overlap(out_dir, hf_model_dir):
        raise MergedExportError(f"the output directory {out_dir} must not be, contain or lie inside the base model {hf_model_dir}.")
    if not os.path.isfile(os.path.join(hf_model_dir, "config.json")):
        raise MergedExportError(f"{hf_model_dir} has no config.json: pass the Hugging Face model directory with --hf-model.")
    _check_base_files(hf_model_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # next to OUT_DIR (same file system as the output), not in a possibly small /tmp
    with tempfile.TemporaryDirectory(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.adapter-", dir=parent) as tmp:
        adapter_dir = consolidate(checkpoint_dir, os.path.join(tmp, "adapter"), hf_model_dir=hf_model_dir,
                                  show_progress=False, allow_nonfinite=allow_nonfinite)
        config = LoraConfig.from_pretrained(adapter_dir)
        expansion = layer_expansion(hf_model_dir, config.layer_replication) if config.layer_replication else None
        with _AdapterFile(os.path.join(adapter_dir, WEIGHTS_NAME), config, hf_model_dir) as adapter, \
                CheckpointReader(hf_model_dir) as reader:
            sources = _tensor_sources(reader, expansion)
            with staged_output(out_dir, overwrite) as staging:
                _write_merged(staging, reader, sources, adapter, limit, show_progress)
                for name in COPIED_FILES:
                    if os.path.isfile(os.path.join(hf_model_dir, name)):
                        shutil.copyfile(os.path.join(hf_model_dir, name), os.path.join(staging, name))
                if expansion is not None:
                    expansion.write_config(os.path.join(staging, "config.json"))
    return out_dir


def _check_base_files(hf_model_dir: str) -> None:
    """Every safetensors file of the base model has a valid header that fits the file's size
    (a truncated download would otherwise fail deep inside the safetensors library)."""
    for name in sorted(os.listdir(hf_model_dir)):
        if name.endswith(".safetensors"):
            try:
                ShardReader(os.path.join(hf_model_dir, name)).close()
            except SafetensorsFormatError as e:
                raise MergedExportError(f"--hf-model: {e}") from None


class _AdapterFile:
    """The consolidated PEFT adapter, read one module at a time; tracks what was used."""

    def __init__(self, path: str, config: LoraConfig, hf_model_dir: Optional[str] = None) -> None:
        self.config = config
        self._file = safe_open(path, framework="pt").__enter__()
        self.keys = frozenset(self._file.keys())
        self.unused = set(self.keys)
        keys = (split_key(k.removeprefix(PREFIX)) for k in self.keys)
        self.modules = {module for module, suffix in keys if suffix in LORA_SUFFIXES}
        if any(not k.startswith(PREFIX) for k in self.keys):
            raise MergedExportError(f"unexpected adapter tensor names: {sorted(self.keys)[:5]}.")  # pragma: no cover
        self.parameters = ParameterDeltas(config, hf_model_dir, self._get) if config.target_parameters else None

    def _get(self, key: str) -> Optional[torch.Tensor]:
        if key not in self.keys:
            return None
        self.unused.discard(key)
        return self._file.get_tensor(key)

    def merged(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Base tensor ``name`` (an HF checkpoint name) with the adapter applied."""
        replaced = self._get(PREFIX + name)  # modules_to_save: the trained copy replaces the base
        if replaced is not None:
            return replaced.to(tensor.dtype)
        merged = self.parameters.merged(name, tensor) if self.parameters is not None else None
        if merged is not None:  # a fused expert / router parameter (target_parameters)
            return merged
        module, _, kind = name.rpartition(".")
        if module not in self.modules or kind not in ("weight", "bias"):
            return tensor
        a, b = self._get(f"{PREFIX}{module}.lora_A.weight"), self._get(f"{PREFIX}{module}.lora_B.weight")
        fan_in_fan_out = self.config.fan_in_fan_out
        if a is None:  # an embedding: PEFT's lora_embedding_A/B, its weight stored [vocab, dim]
            a, b = self._get(f"{PREFIX}{module}.lora_embedding_A"), self._get(f"{PREFIX}{module}.lora_embedding_B")
            fan_in_fan_out = True
        scaling = lm.lora_scaling(self.config.alpha_for(module), a.shape[0], self.config.use_rslora)
        if kind == "bias":
            bias = self._get(f"{PREFIX}{module}.lora_B.bias")
            return tensor if bias is None else lm.merged_bias(tensor, [lm.scaled_bias(bias.float(), scaling)]).to(tensor.dtype)
        delta = lm.delta_weight(a, b, scaling, fan_in_fan_out)
        if delta.shape != tensor.shape:
            raise MergedExportError(f"{module}: ΔW is {tuple(delta.shape)}, the base weight {tuple(tensor.shape)}.")
        magnitude = self._get(f"{PREFIX}{module}.lora_magnitude_vector")
        scale = None  # DoRA: m / ||W + ΔW||_row rescales the weight; the bias is not rescaled
        if magnitude is not None:
            scale = lm.dora_merge_scale(magnitude, lm.dora_norm_sq(tensor, delta, fan_in_fan_out).sqrt())
        return lm.merged_weight(tensor, [(delta, scale)], fan_in_fan_out).to(tensor.dtype)

    def close(self) -> None:
        self._file.__exit__(None, None, None)

    def __enter__(self) -> "_AdapterFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensor_sources(reader: CheckpointReader, expansion: Optional[LayerExpansion]) -> list[tuple[str, str]]:
    """(output name, base name) of every output tensor: the base checkpoint's tensors, or with
    layer replication the expanded stack's."""
    if expansion is None:
        return [(name, name) for name in reader.keys()]
    return expansion.tensor_sources(reader.keys())


def _plan(reader: CheckpointReader, sources: list[tuple[str, str]], limit: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """The output tensors (``sources``: output name, base name) grouped into files of at most
    ``limit`` bytes each (a tensor larger than ``limit`` gets a file of its own), in order."""
    shards: list[list] = [[]]
    size = 0
    for name, base_name in sources:
        part = reader.tensor_slice(base_name)
        dtype, shape = DTYPES[part.get_dtype()], tuple(part.get_shape())
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    return shards


def _write_merged(staging: str, reader: CheckpointReader, sources: list[tuple[str, str]], adapter: _AdapterFile,
                  limit: int, show_progress: bool) -> None:
    base_of = dict(sources)
    shards = _plan(reader, sources, limit)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total = {}, 0
    bar = tqdm(total=sum(map(len, shards)), unit="tensor", desc="merging", disable=not show_progress)
    try:
        for file_name, specs in zip(names, shards):
            with StreamWriter(os.path.join(staging, file_name), specs, metadata={"format": "pt"}) as writer:
                for name, dtype, shape in specs:
                    tensor = adapter.merged(name, reader.read(base_of[name]))
                    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                        raise MergedExportError(f"{name}: the adapter's tensor is {tuple(tensor.shape)}, the base {shape}.")
                    writer.write(name, tensor)
                    weight_map[name] = file_name
                    total += tensor.numel() * tensor.element_size()
                    bar.update(1)
                    del tensor
    finally:
        bar.close()
    if adapter.unused:
        raise MergedExportError(
            f"adapter tensors that match no tensor of the base model: {sorted(adapter.unused)[:5]}"
            f"{' ...' if len(adapter.unused) > 5 else ''}; is --hf-model the model the adapter was trained on?"
        )
    if len(shards) > 1:
        with open(os.path.join(staging, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
