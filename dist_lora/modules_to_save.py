"""modules_to_save: a trainable copy of a module per adapter, the original kept frozen."""

from __future__ import annotations

import copy
from typing import Iterable

import torch.distributed as dist
from torch import nn


def _shared_objects(module: nn.Module) -> dict:
    """A deepcopy memo that keeps process groups (and megatron configs) shared, not copied:
    a megatron parallel layer holds its TP group, which cannot be copied."""
    memo = {}
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, dist.ProcessGroup) or type(value).__name__ in ("TransformerConfig", "ModelParallelConfig"):
                memo[id(value)] = value
    return memo


class ModulesToSaveWrapper(nn.Module):
    """Runs ``modules_to_save[active]`` when an adapter is active, else ``original_module``.

    State-dict keys match PEFT: ``<name>.modules_to_save.<adapter>.<param>``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            clone = copy.deepcopy(self.original_module, memo=_shared_objects(self.original_module))
            for src, dst in zip(self.original_module.parameters(), clone.parameters()):
                dst.__dict__.update(src.__dict__)  # deepcopy drops megatron's sharding markers
            self.modules_to_save[adapter_name] = clone
        self.original_module.requires_grad_(False)
        self.set_adapter([adapter_name] if self.active_adapter is None else [self.active_adapter])

    def set_adapter(self, adapter_names: Iterable[str]) -> None:
        names = [n for n in adapter_names if n in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(f"modules_to_save can have only one active adapter, got {names}.")
        self.active_adapter = names[0] if names else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter)

    def delete(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:  # nn.ModuleDict.pop takes no default
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)
