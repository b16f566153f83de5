"""Data-driven LoRA inits (EVA, CorDA) on a model partitioned by ZeRO-3, before any engine.

(A ZeRO-3 primitive beside :mod:`dist_lora.parallel.zero`: the init drivers check with it; users
reach it as ``dist_lora.deepspeed.gathered_forward``.)

EVA and CorDA need a *data pass*: forwards whose hooks record each target layer's input (an
ordinary activation). A model built under ``deepspeed.zero.Init`` cannot run a forward on its
own: every ``param.data`` is an empty piece until someone gathers it, and the gathering hooks
come only with ``deepspeed.initialize``. But an engine is the wrong place for these inits:
adapters cannot be added or re-shaped once it manages the model (EVA changes ranks, CorDA
rewrites base weights; see :func:`dist_lora.parallel.zero.refuse_registered`), so an engine
would force building the model twice (once to measure, once to train).

:func:`gathered_forward` is the small piece that is missing: for the duration of a ``with``
block it gathers each module's parameters just before its forward and releases them right
after (what ZeRO-3's own hooks do, without an engine, an optimizer or gradients): memory stays
one module's full weights above the partitioned model, as during ZeRO-3 inference. So the flow
is one pass, in the order the adapters need:

EVA::

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        base = AutoModelForCausalLM.from_config(...)   # or from_pretrained under HfDeepSpeedConfig
    model = get_lora_model(base, LoraConfig(r=8, init_lora_weights="eva", eva_config=EvaConfig()))
    with gathered_forward(model):
        initialize_lora_eva_weights(model, dataloader)  # ranks may change; A set, B = 0
    engine, *_ = dist_lora.deepspeed.initialize(model, ds_config)

CorDA::

    with gathered_forward(base):
        preprocess_corda(base, lora_config, run_model=lambda: [base(**b) for b in calibration])
    model = get_lora_model(base, lora_config)          # W <- W - s·B·A, gathered, re-partitioned
    engine, *_ = dist_lora.deepspeed.initialize(model, ds_config)

Every rank runs the block on its own share of the data (EVA and CorDA sum their statistics
over the data-parallel group, the world for a Hugging Face model), so the result equals the
same flow without ZeRO. The weight reads that follow the data pass (CorDA's W·C SVD, the
rewrite of W in ``update_layer``) gather the one weight they need themselves.

Limits: the block runs under ``torch.no_grad`` (no backward through gathered weights); a
parameter used outside the forward of the module that owns it (DeepSpeed's "external
parameters", e.g. a tied head called through ``F.linear`` in another module) is not gathered
for that use; every rank must run the same modules in the same order (each gather is a
collective), as in ZeRO-3 training.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..config import ConfigError
from . import zero

_active: list[nn.Module] = []  # the models inside a gathered_forward block


def _gather_units(model: nn.Module) -> list[tuple[nn.Module, list[torch.Tensor]]]:
    """(module, the ZeRO-3 parameters gathered around its forward): a ZeRO-3 leaf (LoRA layers
    read their base weight and factors directly) takes its whole subtree, any other module its
    own direct parameters."""
    units: list[tuple[nn.Module, list[torch.Tensor]]] = []

    def visit(module: nn.Module) -> None:
        if getattr(module, "_z3_leaf", False):
            params = [p for p in module.parameters() if zero.is_zero3_param(p)]
            if params:
                units.append((module, params))
            return
        params = [p for p in module.parameters(recurse=False) if zero.is_zero3_param(p)]
        if params:
            units.append((module, params))
        for child in module.children():
            visit(child)

    visit(model)
    return units


@contextlib.contextmanager
def gathered_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s forwards work on a ZeRO-3-partitioned model without an
    engine: each module's parameters are gathered (``GatheredParameters``, read only) before
    its forward and released after it. Runs under ``torch.no_grad``. Collective: every rank
    must enter it and run the same forwards. Without ZeRO-3 parameters: just ``no_grad``.
    Yields ``model``."""
    if not zero.has_zero3_params(model):
        with torch.no_grad():
            yield model
        return
    import deepspeed

    open_gathers: dict[int, list[Any]] = {}
    handles = []

    def pre_hook(params: list[torch.Tensor]):
        def hook(module: nn.Module, args: tuple) -> None:
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            gather.__enter__()
            open_gathers.setdefault(id(module), []).append(gather)

        return hook

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        stack = open_gathers.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    for module, params in _gather_units(model):
        handles.append(module.register_forward_pre_hook(pre_hook(params)))
        handles.append(module.register_forward_hook(post_hook, always_call=True))
    _active.append(model)
    try:
        with torch.no_grad():
            yield model
    finally:
        _active.remove(model)
        for handle in handles:
            handle.remove()
        for stack in open_gathers.values():  # a forward that raised before its post hook ran
            while stack:
                stack.pop().__exit__(None, None, None)


def check_forward_ready(model: nn.Module, what: str) -> None:
    """Raise a clear error, before a forward would fail deep inside a layer, when ``model``
    holds ZeRO-3 parameters that are partitioned (empty) and nothing will gather them: no
    :func:`gathered_forward` block around it (or around a module containing it) and no
    DeepSpeed engine hooked to it. A no-op without ZeRO-3."""
    params = [p for p in model.parameters() if zero.is_zero3_param(p)]
    if not params or all(p.data.numel() > 0 for p in params):
        return
    if _inside_active(model):
        return
    if any(isinstance(getattr(m, "ds_id", None), int) for m in model.modules()):  # an engine's hooks
        return
    raise ConfigError(
        f"{what}: the model is partitioned by DeepSpeed ZeRO-3 (built under deepspeed.zero.Init), so its "
        "weights are empty here and a forward pass cannot run. Run the data pass inside "
        "dist_lora.deepspeed.gathered_forward(model), before deepspeed.initialize: e.g. "
        "`with gathered_forward(model): initialize_lora_eva_weights(model, dataloader)` or "
        "`with gathered_forward(base): preprocess_corda(base, config, run_model)`; then "
        "dist_lora.deepspeed.initialize(model, ds_config). See dist_lora/parallel/zero_forward.py."
    )


def _inside_active(model: nn.Module) -> bool:
    """Whether ``model`` is, or lies inside, a model in an active block (e.g. the base model of
    an active LoraModel). A block around a part only does not count: the rest would not gather."""
    return any(any(m is model for m in active.modules()) for active in _active)
