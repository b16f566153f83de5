"""Load a Hugging Face PEFT LoRA adapter into a tensor/pipeline-parallel megatron GPTModel.

The inverse of :func:`dist_lora.release.consolidate.consolidate`: a PEFT adapter for a
Llama-family HF model, translated to megatron modules (:func:`.translate.translate_peft_adapter`:
q/k/v and gate/up fused, see :mod:`.fuse`), becomes an adapter on the megatron model built from
that HF model (:func:`dist_lora.bridges.build_megatron_gpt`), at any TP size, computing the PEFT
model's function exactly (to fp32 rounding). Each rank slices the full factors to its shard.

Refused before the model is touched: whatever :func:`.translate.translate_peft_adapter` refuses,
and a megatron model whose geometry differs from the HF model's.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..bridges import HFLlamaArch, layer_module_name, megatron_geometry_mismatch, split_layer_name
from ..checkpoint.peft_format import resolve_parameter, set_tensor
from ..model import LoraModel, get_lora_model
from ..naming import global_module_name
from .translate import MegatronAdapter, PeftToMegatronError, translate_peft_adapter


def load_peft_adapter_into_megatron(
    model: LoraModel | torch.nn.Module,
    adapter_dir: str | os.PathLike,
    hf_model_dir: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> LoraModel:
    """Load the PEFT adapter in ``adapter_dir`` (for the HF model in ``hf_model_dir``) into a
    megatron GPTModel built from that HF model, at any TP/PP layout; every rank calls it.

    ``model`` is a bare GPTModel (it is wrapped with :func:`dist_lora.get_lora_model` using the
    translated config; ``adapter_name`` becomes the active adapter) or a :class:`LoraModel`
    around one (the adapter is added, not activated: ``set_adapter`` it, as with PEFT's
    ``load_adapter``). ``is_trainable=False`` freezes the adapter (inference mode).
    Returns the LoraModel. All checks run before the model is changed; if loading fails after
    the adapter was created, it is removed again (and a bare model unwrapped).
    """
    adapter = translate_peft_adapter(adapter_dir, hf_model_dir)
    config = adapter.config
    config.inference_mode = not is_trainable
    gpt = model.model if isinstance(model, LoraModel) else model
    while not hasattr(gpt, "decoder") and isinstance(getattr(gpt, "module", None), torch.nn.Module):
        gpt = gpt.module  # megatron DDP / Float16Module wrappers
    _check_model(gpt, adapter.arch, os.fspath(hf_model_dir))
    if isinstance(model, LoraModel):
        model.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
        lora_model, flags = model, None
    else:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            lora_model = get_lora_model(model, config, adapter_name, low_cpu_mem_usage=True, seed=0)
        except Exception:
            _restore(flags)
            raise
    try:
        _assign(lora_model, adapter, adapter_name, os.fspath(adapter_dir))
    except Exception:
        lora_model.discard_adapter(adapter_name)
        if flags is not None:
            _restore(flags)
        raise
    lora_model.mark_trainable()
    return lora_model


def _restore(flags: list[tuple[torch.nn.Parameter, bool]]) -> None:
    for param, requires_grad in flags:
        param.requires_grad_(requires_grad)


def _check_model(gpt: torch.nn.Module, arch: HFLlamaArch, hf_model_dir: str) -> None:
    config = getattr(gpt, "config", None)
    if config is None or not hasattr(gpt, "decoder") or not hasattr(config, "num_query_groups"):
        raise TypeError(
            f"load_peft_adapter_into_megatron needs a megatron GPTModel (or a LoraModel around one), got "
            f"{type(gpt).__name__}; for a Hugging Face model use LoraModel.from_pretrained / load_adapter."
        )
    differing = megatron_geometry_mismatch(config, arch)
    if differing:
        raise PeftToMegatronError(
            f"the megatron model does not match the HF model at {hf_model_dir}: {', '.join(differing)}. "
            "Build it from that checkpoint (build_megatron_gpt)."
        )


@torch.no_grad()
def _assign(lora_model: LoraModel, adapter: MegatronAdapter, adapter_name: str, source: str) -> None:
    """Slice each module's full factors to this rank's shard and set them; every check
    first, then the updates."""
    updates, seen = [], set()
    stage = {
        global_name
        for name, _ in lora_model.model.named_modules()
        if name and (global_name := _global_layer_module(lora_model.model, name)) is not None
    }
    for name, layer in lora_model.lora_layers():
        if adapter_name not in layer.lora_A:
            continue
        global_name = _global_layer_module(lora_model.model, name)
        factors = adapter.modules.get(global_name) if global_name else None
        if factors is None:  # pragma: no cover - the config targets exactly adapter.modules
            raise PeftToMegatronError(f"module {name} got adapter {adapter_name!r} but {source} has no factors for it.")
        seen.add(global_name)
        if factors.a.shape[1] != layer.in_features or factors.b.shape[0] != layer.out_features:
            raise PeftToMegatronError(
                f"{global_name}: the adapter's factors are [{factors.r}, {factors.a.shape[1]}] / "
                f"[{factors.b.shape[0]}, {factors.r}], the layer has in/out features "
                f"{layer.in_features}/{layer.out_features}."
            )
        pieces = [("lora_A.weight", layer.shard_a(factors.a)), ("lora_B.weight", layer.shard_b(factors.b))]
        if factors.bias is not None:
            pieces.append(("lora_B.bias", layer.shard_b(factors.bias)))
        for path, value in pieces:
            sub, pname = resolve_parameter(layer, path, adapter_name)
            expected = tuple(getattr(sub, pname).shape)
            if tuple(value.shape) != expected:
                raise PeftToMegatronError(
                    f"{global_name}.{path}: this rank's shard has shape {tuple(value.shape)}, the model expects "
                    f"{expected}."
                )
            updates.append((sub, pname, value))
    unassigned = sorted(set(adapter.modules) & stage - seen)
    if unassigned:  # pragma: no cover - the config targets exactly adapter.modules
        raise PeftToMegatronError(f"modules {unassigned[:4]} of this pipeline stage got no adapter.")
    for sub, pname, value in updates:
        set_tensor(sub, pname, value)


def _global_layer_module(model: torch.nn.Module, name: str) -> Optional[str]:
    """``decoder.layers.<global N>.<submodule>`` of a local module name (any prefix before
    ``decoder.layers`` dropped), None outside the decoder layers."""
    parsed = split_layer_name(global_module_name(model, name))
    return layer_module_name(*parsed) if parsed else None
