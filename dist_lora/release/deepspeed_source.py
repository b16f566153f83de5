"""A DeepSpeed ZeRO checkpoint of LoRA training as a release source (``dist-lora consolidate``).

:func:`read_deepspeed` turns it into the :class:`~.sources.AdapterSource` that
:func:`.consolidate.consolidate_deepspeed` feeds through the same stages as a sharded
checkpoint. One process, no process group, no DeepSpeed code run (see
:mod:`dist_lora.checkpoint.deepspeed_reader` for the layout and the safe loading). Input: the
directory given to ``engine.save_checkpoint(dir)`` (or one of its tag directories) of a run
where only adapter parameters were trainable, at ZeRO stage 1, 2 or 3, any data-parallel size,
no model parallelism. Output, into ``out_dir``: ``adapter_model.safetensors`` (fp32 master
weights) + ``adapter_config.json``, which ``peft.PeftModel.from_pretrained`` loads onto the
Hugging Face model.

Parameter names -> PEFT keys. The engine's module is a dist_lora ``LoraModel`` (names
``model.<hf module>...``) or a PEFT ``PeftModel`` (``base_model.model.<hf module>...``): a
prefix shared by every parameter name (trainable and frozen) is dropped. ``model.`` alone is
ambiguous (an HF CausalLM with tied embeddings names all its parameters ``model.*``): with
``hf_model_dir`` the reading under which the adapted modules exist in the HF model wins,
without it the LoraModel reading is taken. Then::

    <m>.lora_A.<adapter>.weight                -> base_model.model.<m>.lora_A.weight
    <m>.lora_B.<adapter>.weight / .bias        -> base_model.model.<m>.lora_B.weight / .bias
    <m>.lora_magnitude_vector.<adapter>.weight -> base_model.model.<m>.lora_magnitude_vector
    <m>.modules_to_save.<adapter>.<p>          -> base_model.model.<m>.<p>

The LoraConfig is not in a DeepSpeed checkpoint. It is read from ``config`` (a directory with
``adapter_config.json`` or the file itself), else from ``adapter_config.json`` in the save
directory or the tag directory: save it there when you save the checkpoint, e.g.
``model.peft_config["default"].save_pretrained(save_dir)`` (dist_lora and PEFT alike).

Checks before anything is written: every rank's optimizer partition is present and readable
(the error names a missing file and its rank), the trainable tensors are adapter tensors of
``adapter`` (else the error lists what was found), every adapted module has its factors, ranks
agree with the config, at ZeRO-1/2 the fp32 masters equal the saved module weights, and with
``hf_model_dir`` every key names a module of the HF model with the right shape. The output is
staged and renamed into place by :mod:`.write` (with its progress bar), so a failure leaves
``out_dir`` as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Iterator, Optional

import torch

from ..checkpoint.deepspeed_reader import DeepSpeedCheckpoint
from ..checkpoint.manifest import read_adapter_config
from ..config import CONFIG_NAME, LoraConfig
from .errors import ConsolidationError, as_consolidation_error
from .hf_model import hf_modules
from .sources import AdapterSource, Read, Source

_WRAPPER_PREFIXES = ("base_model.model.", "model.")  # PeftModel, dist_lora LoraModel
_ADAPTER_KEY = re.compile(
    r"(?P<module>.+)\.(?:(?P<factor>lora_A|lora_B|lora_magnitude_vector)\.(?P<a1>[^.]+)\.(?P<param>weight|bias)"
    r"|modules_to_save\.(?P<a2>[^.]+)\.(?P<saved>.+))"
)


@dataclasses.dataclass
class DeepSpeedSource(AdapterSource):
    """A DeepSpeed checkpoint's adapter tensors (fp32 masters) under PEFT-style keys."""

    checkpoint: DeepSpeedCheckpoint
    names: dict[str, str]  # key -> the engine's parameter name

    @contextlib.contextmanager
    def reading(self) -> Iterator[Read]:
        def read(source: Source) -> torch.Tensor:
            with as_consolidation_error():
                return self.checkpoint.tensor(self.names[source.key])

        yield read


def read_deepspeed(
    checkpoint_dir: str,
    config: Optional[str | os.PathLike] = None,
    adapter: str = "default",
    hf_model_dir: Optional[str] = None,
    tag: Optional[str] = None,
) -> DeepSpeedSource:
    """Adapter ``adapter`` of the DeepSpeed checkpoint in ``checkpoint_dir`` (the ``latest``
    tag unless ``tag``) with its LoraConfig (see the module docstring); ``hf_model_dir`` decides
    an ambiguous wrapper prefix. Checks every partition and, at ZeRO-1/2, the fp32 masters
    against the saved module weights."""
    with as_consolidation_error():
        checkpoint = DeepSpeedCheckpoint(checkpoint_dir, tag)
    lora_config = _load_config(config, checkpoint_dir, checkpoint.dir)
    modules = set(hf_modules(hf_model_dir, lora_config.layer_replication)) if hf_model_dir else None
    trainable = list(checkpoint.shapes)
    names = adapter_names(trainable, adapter, checkpoint.dir, trainable + checkpoint.frozen_names, modules)
    with as_consolidation_error():
        checkpoint.check_against_module_state(list(names))
    tensors = {key: Source(key, tuple(checkpoint.shapes[name]), torch.float32, []) for name, key in names.items()}
    return DeepSpeedSource(lora_config, tensors, checkpoint.dir, checkpoint, {key: name for name, key in names.items()})


def adapter_names(
    trainable: list[str], adapter: str, where: str, all_names: Optional[list[str]] = None,
    hf_names: Optional[set[str]] = None,
) -> dict[str, str]:
    """Trainable parameter name -> adapter key (``<hf module>.lora_A.weight`` ..., no prefix).

    Every trainable tensor must belong to some adapter; those of ``adapter`` are returned.
    ``all_names`` (trainable and frozen) and ``hf_names`` decide the wrapper prefix."""
    prefix = _wrapper_prefix(all_names or trainable, hf_names)
    found_adapters, others, out = set(), [], {}
    for name in trainable:
        m = _ADAPTER_KEY.fullmatch(name)
        if m is None:
            others.append(name)
            continue
        module = m["module"].removeprefix(prefix)
        if m["factor"]:
            found_adapters.add(m["a1"])
            suffix = "lora_magnitude_vector" if m["factor"] == "lora_magnitude_vector" else f"{m['factor']}.{m['param']}"
            key, name_adapter = f"{module}.{suffix}", m["a1"]
        else:
            found_adapters.add(m["a2"])
            key, name_adapter = f"{module}.{m['saved']}", m["a2"]
        if name_adapter == adapter:
            out[name] = key
    if others:
        raise ConsolidationError(
            f"checkpoint {where} has {len(others)} trainable tensors that are not LoRA adapter tensors, e.g. "
            f"{others[:3]}: this is not adapter-only training (for a full fine-tune use DeepSpeed's zero_to_fp32)."
        )
    if not out:
        what = f"adapters {sorted(found_adapters)}" if found_adapters else f"trainable tensors {trainable[:3] or 'none'}"
        raise ConsolidationError(
            f"checkpoint {where} has no tensors of adapter {adapter!r}; it holds {what}"
            + (" (pass --adapter)" if found_adapters else "")
            + "."
        )
    return out


def _wrapper_prefix(names: list[str], hf_names: Optional[set[str]] = None) -> str:
    """The wrapper prefix shared by every parameter name (trainable and frozen): PEFT's
    ``base_model.model.``, dist_lora's ``model.`` or none. ``model.`` is ambiguous (an HF
    CausalLM with tied embeddings has only ``model.*`` parameters too): with the HF model's
    module names the prefix under which the adapted modules exist wins; without them the
    LoraModel reading is taken."""
    candidates = [p for p in _WRAPPER_PREFIXES if names and all(n.startswith(p) for n in names)] + [""]
    if hf_names is not None:
        for prefix in candidates:
            modules = {m["module"].removeprefix(prefix) for n in names if (m := _ADAPTER_KEY.fullmatch(n))}
            if modules and modules <= hf_names:
                return prefix
    return candidates[0]


def _load_config(config: Optional[str | os.PathLike], save_dir: str, tag_dir: str) -> LoraConfig:
    if config is not None:
        config = os.fspath(config)
        directory = os.path.dirname(config) if os.path.basename(config) == CONFIG_NAME else config
        if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            raise ConsolidationError(f"--config {config}: no {CONFIG_NAME} there.")
        candidates = [directory]
    else:
        candidates = [save_dir, tag_dir]
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            with as_consolidation_error():
                return read_adapter_config(directory)
    raise ConsolidationError(
        f"a DeepSpeed checkpoint holds no LoRA config and there is no {CONFIG_NAME} in {save_dir} or {tag_dir}: "
        "pass --config DIR (a directory with the adapter_config.json of the run), or save it next to the "
        "checkpoint: model.peft_config['default'].save_pretrained(save_dir)."
    )
