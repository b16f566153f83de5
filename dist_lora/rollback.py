"""Put a model back exactly as it was when an operation on it fails half way.

Adding or loading an adapter changes a model in several places: it replaces target modules by
LoRA layers (or adds an adapter to existing ones), wraps modules_to_save, freezes parameters,
may expand the layer stack (layer_replication) and may rewrite base weights (PiSSA, OLoRA,
CorDA, LoftQ). :class:`ModelSnapshot` records, before the operation, what it can change:

- every module's children (``_modules``), so replaced and added modules are undone;
- the adapters and active adapters of existing LoRA layers, and those and the enabled state
  of modules_to_save wrappers (their plain-dict bookkeeping is not in ``_modules``);
- ``requires_grad`` of every parameter and ``training`` of every module;
- CorDA's per-layer data (``corda_eigens``), which an init consumes;
- base weights, on demand (:meth:`keep_weight`, called just before a weight is rewritten): a
  CPU copy of this rank's data (its ZeRO-3 partition), so undoing is exact. This costs host
  memory of the size of the rewritten weights while the operation runs, and only for inits
  that rewrite them.

:meth:`restore` puts all of it back. The LoraModel-level state (its configs, active adapters,
replication) is restored by :meth:`dist_lora.model.LoraModel.rollback_on_error`, which uses this.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .parallel.zero import is_zero3_param
from .layers.base import LoraLayer
from .modules_to_save import ModulesToSaveWrapper

# Attributes an init consumes from the base layer (deleted once used).
_CONSUMED_ATTRIBUTES = ("corda_eigens",)


def _local_data(param: torch.Tensor) -> torch.Tensor:
    """The tensor that holds this rank's values of ``param`` (its partition under ZeRO-3)."""
    return param.ds_tensor if is_zero3_param(param) else param.data


class ModelSnapshot:
    """What an adapter operation may change in ``model``; :meth:`restore` undoes it."""

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())
        self._children = [(m, dict(m._modules)) for m in modules]
        self._training = [(m, m.training) for m in modules]
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self._layers = [(m, set(m.r), m.active_adapters) for m in modules if isinstance(m, LoraLayer)]
        self._wrappers = [
            (m, set(m.modules_to_save), m.active_adapter, m.disabled)
            for m in modules
            if isinstance(m, ModulesToSaveWrapper)
        ]
        self._attributes = [
            (m, name, getattr(m, name)) for m in modules for name in _CONSUMED_ATTRIBUTES if hasattr(m, name)
        ]
        self._weights: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._kept: set[int] = set()

    def keep_weight(self, param: torch.Tensor, copy: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Record ``param``'s local values before something rewrites them: ``copy`` (one an
        enclosing snapshot has just taken, so nested snapshots share it) or a new host copy.
        Returns the copy, None if this snapshot holds one already."""
        if id(param) in self._kept or param.is_meta:
            return None
        copy = _local_data(param).detach().to("cpu", copy=True) if copy is None else copy
        self._kept.add(id(param))
        self._weights.append((param, copy))
        return copy

    @torch.no_grad()
    def restore(self) -> None:
        """Undo every change listed in the module docstring."""
        for param, saved in self._weights:
            _local_data(param).copy_(saved)
        for layer, adapters, active in self._layers:
            added = set(layer.r) | set(layer.lora_alpha) | set(layer.scaling) | set(layer.use_rslora)
            for name in sorted(added - adapters):
                layer.delete_adapter(name)
            layer.set_adapter(active)  # its requires_grad flags are restored below
        for wrapper, adapters, active, disabled in self._wrappers:
            for name in [n for n in wrapper.modules_to_save if n not in adapters]:
                wrapper.delete(name)
            wrapper.active_adapter, wrapper.disabled = active, disabled
        for module, children in self._children:
            if not _same_children(module._modules, children):
                module._modules.clear()
                module._modules.update(children)
        for module, name, value in self._attributes:
            if not hasattr(module, name):
                setattr(module, name, value)
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)
        for module, training in self._training:
            module.training = training


def _same_children(now: dict[str, Any], before: dict[str, Any]) -> bool:
    return now.keys() == before.keys() and all(now[k] is before[k] for k in before)
