"""Build an FSDP2 LoRA model without any rank holding the whole model.

    lora = load_sharded_lora_model(hf_dir, LoraConfig(...), mp_policy=bf16_policy(), dtype=torch.bfloat16)

Steps (every rank):

1. the HF model is created on the meta device from its ``config.json`` (no memory), the
   adapters are injected on meta (``get_lora_model(low_cpu_mem_usage=True)``);
2. :func:`~.shard.shard_lora_model` shards the (still empty) parameters;
3. ``to_empty`` allocates only this rank's shards;
4. each base tensor's rows of this rank (FSDP2 splits dim 0 like ``torch.chunk``) are read
   from the safetensors files with a sliced read (:class:`~dist_lora.bridges.checkpoint_reader.CheckpointReader`):
   no rank reads a row it does not keep;
5. each adapter factor is drawn in full from its seed, exactly as ``get_lora_model`` draws it
   (``layer.init_factors``, seed per module and adapter: :func:`dist_lora.layers.math.init_seed`),
   and this rank's rows are kept (adapter-sized temporaries only);
6. buffers: persistent ones read from the checkpoint, computed ones (rotary ``inv_freq``)
   taken from a fresh instance of their module.

So the result equals ``shard_lora_model(get_lora_model(AutoModelForCausalLM.from_pretrained(hf_dir), config))``
(tests/test_fsdp2_meta.py). Refused (they need the full base weight at init, or copies of
modules): DoRA, PiSSA/OLoRA/CorDA/LoftQ/EVA inits, ``modules_to_save``, ``layer_replication``
(build those the ordinary way and call ``shard_lora_model``).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.distributed as dist

from ..bridges.checkpoint_reader import CheckpointReader
from ..config import ConfigError, LoraConfig
from ..layers import math as lm
from ..model import LoraModel, get_lora_model
from ..naming import global_module_name
from .shard import shard_lora_model


def check_meta_config(config: LoraConfig) -> None:
    """Refuse what the meta-device path cannot initialise (see the module docstring)."""
    problems = []
    if config.use_dora:
        problems.append("use_dora (the magnitude is the norm of the full base weight)")
    if not config.init_kind.seeded:
        problems.append(f"init_lora_weights={config.init_lora_weights!r} (computed from the base weight or data)")
    if config.modules_to_save:
        problems.append("modules_to_save (copies of base modules)")
    if config.layer_replication:
        problems.append("layer_replication")
    if problems:
        raise ConfigError("load_sharded_lora_model cannot initialise " + "; ".join(problems) + ": build the model "
                          "with get_lora_model on a loaded model, then call shard_lora_model.")


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows [start, end) of dim 0 this rank holds of the DTensor ``param`` (FSDP2: chunks
    of ceil(n / shards) rows; Replicate placements on the other mesh dims)."""
    from torch.distributed.tensor import Shard

    n = param.shape[0]
    shard_dims = [i for i, p in enumerate(param.placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or param.placements[shard_dims[0]].dim != 0:
        raise ValueError(f"expected one Shard(0) placement, got {param.placements}.")
    dim = shard_dims[0]
    size, index = param.device_mesh.size(dim), param.device_mesh.get_coordinate()[dim]
    chunk = math.ceil(n / size) if n else 0
    start = min(index * chunk, n)
    return start, min(start + chunk, n)


def _copy_rows(param: torch.Tensor, rows: torch.Tensor) -> None:
    with torch.no_grad():
        param.to_local().copy_(rows.to(param.dtype))


def _hf_key(name: str) -> str:
    """A LoraModel parameter name -> the HF checkpoint key (``model.`` root and ``base_layer.`` dropped)."""
    return name.removeprefix("model.").replace(".base_layer.", ".")


def _load_base(model: LoraModel, hf_dir: str) -> None:
    adapter_ids = {id(p) for _, layer in model.lora_layers() for p in layer.adapter_parameters()}
    with CheckpointReader(hf_dir) as reader:
        for name, param in model.named_parameters():
            if id(param) in adapter_ids:
                continue
            key = _hf_key(name)
            if key not in reader:
                raise ConfigError(f"{hf_dir} has no tensor {key} (parameter {name}); is it the model's checkpoint?")
            if tuple(reader.shape(key)) != tuple(param.shape):
                raise ConfigError(f"{hf_dir}: {key} has shape {reader.shape(key)}, the model {tuple(param.shape)}.")
            start, end = _local_rows(param)
            _copy_rows(param, reader.read(key, slice(start, end)))


def _init_adapters(model: LoraModel) -> None:
    for name, layer in model.lora_layers():
        for adapter in layer.lora_A:
            config = model.peft_config[adapter]
            seed = lm.init_seed(model.adapter_seed, global_module_name(model.model, name), adapter)
            a, b, bias = layer.init_factors(layer.r[adapter], config.init_kind.value, seed, config.lora_bias)
            targets = [(layer.lora_A[adapter].weight, a), (layer.lora_B[adapter].weight, b)]
            if bias is not None:
                targets.append((layer.lora_B[adapter].bias, bias))
            for param, full in targets:
                start, end = _local_rows(param)
                _copy_rows(param, full[start:end])


def _init_buffers(model: LoraModel, hf_dir: str, device: torch.device) -> None:
    """Buffers left empty by the meta device: persistent ones are read from the checkpoint
    (whole: FSDP2 does not shard buffers), non-persistent ones (rotary ``inv_freq``) come from
    a fresh instance of their module built from its ``config``."""
    with CheckpointReader(hf_dir) as reader:
        for module_name, module in model.named_modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if name not in module._non_persistent_buffers_set:
                    key = _hf_key(f"{module_name}.{name}")
                    if key not in reader:
                        raise ConfigError(f"{hf_dir} has no buffer {key}; load this model the ordinary way.")
                    with torch.no_grad():
                        buffer.copy_(reader.read(key))
            if not module._non_persistent_buffers_set:
                continue
            config = getattr(module, "config", None)
            if config is None:
                raise NotImplementedError(f"{module_name} ({type(module).__name__}) has computed buffers that cannot be "
                                          "rebuilt after meta-device construction; load this model the ordinary way.")
            with torch.device(device):
                fresh = type(module)(config)
            for name in module._non_persistent_buffers_set:
                setattr(module, name, getattr(fresh, name))
            for name, value in vars(fresh).items():  # e.g. rotary attention_scaling, computed with the buffers
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.startswith("_"):
                    setattr(module, name, value)


def load_sharded_lora_model(
    hf_dir: str | os.PathLike,
    config: LoraConfig,
    mesh=None,
    mp_policy=None,
    dtype: torch.dtype = torch.float32,
    seed: Optional[int] = None,
    device: Optional[torch.device] = None,
    **shard_options,
) -> LoraModel:
    """The HF causal LM in ``hf_dir`` with adapter ``config``, sharded by FSDP2, built without a
    full copy on any rank (see the module docstring). Every rank calls it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_meta_config(config)
    if not dist.is_initialized():
        raise RuntimeError("load_sharded_lora_model needs a process group (torchrun).")
    hf_dir = os.fspath(hf_dir)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir), dtype=dtype)
    model = get_lora_model(base, config, seed=seed, low_cpu_mem_usage=True)
    shard_lora_model(model, mesh=mesh, mp_policy=mp_policy, **shard_options)
    model.to_empty(device=device)
    _load_base(model, hf_dir)
    _init_adapters(model)
    _init_buffers(model, hf_dir, device)
    return model
