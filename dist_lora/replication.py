"""Layer replication (PEFT's ``layer_replication``): a deeper stack built from the same weights.

Index math. The model has L layers 0..L-1; the ranges are mergekit-style half-open pairs
``[[s_0, e_0), [s_1, e_1), ...]`` with ``0 <= s_i < e_i <= L``. The expanded stack is::

    source = [s_0, ..., e_0 - 1,  s_1, ..., e_1 - 1,  ...]      (K = Σ (e_i - s_i) layers)

and position k of it runs original layer ``source[k]``: ``[[0, 4], [2, 5]]`` on 5 layers gives
``[0, 1, 2, 3, 2, 3, 4]``. From then on layer k *is* position k everywhere: module names
(``decoder.layers.k`` / ``model.layers.k``), megatron ``layer_number = k + 1``, HF
``layer_idx = k`` (so a KV cache has one slot per position), adapter seeds, checkpoint keys
and consolidated PEFT names. The model config says K layers (megatron ``num_layers``, HF
``num_hidden_layers``); per-layer config lists (HF ``layer_types``, megatron
``no_rope_freq``) become ``[old[source[k]] for k in range(K)]``.

Sharing. The first use of an original layer is the layer object itself; each later use is
:func:`share_clone` of it: new module objects (so each gets its own LoRA layers, hooks and
layer index) whose ``_parameters`` / ``_buffers`` dicts hold the *same* Parameter and buffer
objects. No tensor is allocated, not even briefly (PEFT deep-copies each layer, then re-links
the parameters). Merging into a shared weight would add every replica's ΔW to it, so
merging is refused; :func:`materialize` copies the shared weights on purpose first.

Megatron: PP = 1 only (a range may span pipeline stages, whose weights live elsewhere).
"""

from __future__ import annotations

import copy
import dataclasses
import types
from typing import Any, Optional

import torch
from torch import nn

from .config import ConfigError
from .config_rules import check_layer_replication
from .merge import MergeError

# Where the decoder layers live: megatron GPTModel, HF *ForCausalLM (Llama/Qwen2/Qwen3, GPT-2), bare HF models.
LAYER_STACKS = ("decoder.layers", "model.layers", "transformer.h", "layers", "h")
# Per-layer index attributes: megatron (1-based) and Hugging Face (0-based).
INDEX_ATTRIBUTES = {"layer_number": 1, "layer_idx": 0}


def expand_ranges(ranges: Any, num_layers: int) -> list[int]:
    """``source``: original layer index of each position of the expanded stack (see module doc).
    Raises :class:`ConfigError` naming the first range that is malformed or beyond the model."""
    check_layer_replication(ranges)
    for start, end in ranges:
        if end > num_layers:
            raise ConfigError(
                f"layer_replication range {[start, end]!r} reaches beyond the model's {num_layers} layers "
                f"(ranges are [start, end) over layers 0..{num_layers - 1})."
            )
    return [i for start, end in ranges for i in range(start, end)]


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's decoder layers."""
    for path in LAYER_STACKS:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList):
            return path, stack
    raise ConfigError(
        f"layer_replication: cannot find the decoder layers of {type(model).__name__} "
        f"(looked for a ModuleList at {', '.join(LAYER_STACKS)})."
    )


def share_clone(module: nn.Module) -> nn.Module:
    """A structural copy of ``module``: new module objects with their own containers (the
    ``_modules`` / ``_parameters`` / ``_buffers`` / hook dicts, any dict, list or set attribute)
    holding the same Parameter, buffer and other objects. No tensor is allocated. Plain
    attributes that point into the tree (a module or a bound method) follow it."""
    memo: dict[int, nn.Module] = {}
    clone = _clone_tree(module, memo)
    for new in memo.values():
        for key, value in vars(new).items():
            if isinstance(value, nn.Module) and id(value) in memo:
                new.__dict__[key] = memo[id(value)]
            elif isinstance(value, types.MethodType) and id(value.__self__) in memo:
                new.__dict__[key] = types.MethodType(value.__func__, memo[id(value.__self__)])
    return clone


def _clone_tree(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a submodule used twice inside the layer stays one module
        return memo[id(module)]
    clone = copy.copy(module)  # new object, same attribute values
    memo[id(module)] = clone
    for key, value in vars(module).items():
        if key != "_modules" and isinstance(value, (dict, list, set)):
            clone.__dict__[key] = copy.copy(value)  # own _parameters/_buffers/hook dicts, same tensors
    clone.__dict__["_modules"] = {
        name: None if child is None else _clone_tree(child, memo) for name, child in module._modules.items()
    }
    return clone


def _set_layer_index(layer: nn.Module, position: int) -> None:
    for module in layer.modules():
        for attr, base in INDEX_ATTRIBUTES.items():
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(module, attr, position + base)


@dataclasses.dataclass
class Replication:
    """What :func:`replicate_layers` did, enough to undo it (:meth:`restore`)."""

    ranges: list[list[int]]
    source: list[int]  # original layer of each position
    stack_name: str
    original_layers: list[nn.Module]  # for restore; keeps layers a shrinking map drops alive
    original_config: dict[str, Any]  # config fields changed, with their old values
    materialized: bool = False

    def restore(self, model: nn.Module) -> None:
        """Put the original layers, indices and config values back (adapters must be gone)."""
        parent_name, _, child = self.stack_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.ModuleList(self.original_layers))
        for position, layer in enumerate(self.original_layers):
            _set_layer_index(layer, position)
        config = _stack_config(parent)
        for key, value in self.original_config.items():
            setattr(config, key, value)
        if hasattr(parent, "num_layers_per_pipeline_rank"):
            parent.num_layers_per_pipeline_rank = len(self.original_layers)

    def refuse_merge_unless_materialized(self) -> None:
        """Replicas share their base weights: a merge is refused until :func:`materialize` ran."""
        if not self.materialized:
            raise MergeError(
                f"this model's layers are replicated (layer_replication={self.ranges}): replicas "
                "share their base weights, so merging would add every replica's adapter to the one shared "
                "weight. Use merge_and_unload(materialize=True) (or materialize_replicated_layers() first) "
                "to copy the shared weights into a dense expanded model and merge into that."
            )


def _stack_config(parent: nn.Module) -> Any:
    """The config that counts the layers: megatron's TransformerBlock.config, HF's model.config."""
    return getattr(parent, "config", None)


def replicate_layers(model: nn.Module, ranges: Any) -> Replication:
    """Replace the model's layer stack by the expanded stack of ``ranges`` (see module doc).

    Position k runs original layer ``source[k]``; its parameters and buffers are that layer's
    own objects (never copied). Megatron: ``layer_number`` of every module in position k
    becomes k + 1 and the config's ``num_layers`` K. Hugging Face: ``layer_idx`` becomes k,
    ``num_hidden_layers`` K and ``layer_types`` is expanded.
    """
    stack_name, stack = find_layer_stack(model)
    parent_name = stack_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    config = _stack_config(parent)
    megatron = hasattr(config, "num_layers") and hasattr(config, "tensor_model_parallel_size")
    if megatron and getattr(config, "pipeline_model_parallel_size", 1) > 1:
        raise NotImplementedError(
            "layer_replication with pipeline parallelism is not supported: a replicated range may span "
            "pipeline stages, and a stage does not hold the other stages' weights. Use PP=1."
        )
    source = expand_ranges(ranges, len(stack))
    original = list(stack)
    layers, used = [], set()
    for position, index in enumerate(source):
        layer = original[index] if index not in used else share_clone(original[index])
        used.add(index)
        _set_layer_index(layer, position)
        layers.append(layer)

    changed: dict[str, Any] = {}
    if config is not None:
        count_field = "num_layers" if megatron else "num_hidden_layers"
        per_layer = ("no_rope_freq",) if megatron else ("layer_types",)
        if hasattr(config, count_field):
            changed[count_field] = getattr(config, count_field)
        for key in per_layer:
            value = getattr(config, key, None)
            if isinstance(value, list) and len(value) == len(original):
                changed[key] = value
        for key, value in changed.items():
            expanded = len(layers) if key == count_field else [value[i] for i in source]
            setattr(config, key, expanded)
    setattr(parent, stack_name.rpartition(".")[2], nn.ModuleList(layers))
    if hasattr(parent, "num_layers_per_pipeline_rank"):
        parent.num_layers_per_pipeline_rank = len(layers)
    return Replication([list(r) for r in ranges], source, stack_name, original, changed)


def replicate_for_adapter(
    model: nn.Module, done: Optional[Replication], ranges: Any, adapters: list[str]
) -> Optional[Replication]:
    """The model's replication once an adapter with ``layer_replication=ranges`` is added next to
    ``adapters``: ``done`` when the ranges are the same (every adapter of a replicated model must
    give them), else the stack replicated now (only the first adapter may ask for it)."""
    done_ranges = None if done is None else done.ranges
    if ranges == done_ranges:
        return done
    if done_ranges is not None:
        raise ConfigError(
            f"the model's layers were replicated with layer_replication={done_ranges}; an adapter with "
            f"layer_replication={ranges} cannot be added (every adapter must give the same ranges)."
        )
    if adapters:
        raise ConfigError(
            f"layer_replication={ranges} must be given by the first adapter: adapters "
            f"{sorted(adapters)} already sit on the original layers."
        )
    return replicate_layers(model, ranges)


@torch.no_grad()
def materialize(model: nn.Module, replication: Optional[Replication]) -> int:
    """Give each replica its own copy of every parameter and buffer it shares with an earlier
    layer of the stack (weights copied on purpose: the model becomes a dense K-layer model
    that can be merged). Returns the number of bytes copied (0 if nothing was shared)."""
    if replication is None:
        return 0
    _, stack = find_layer_stack(model)
    earlier: set[int] = set()  # tensors owned by the layers before this one
    copied = 0
    for layer in stack:
        copies: dict[int, torch.Tensor] = {}  # per layer, so a tie inside one layer stays a tie
        for module in layer.modules():
            for registry in (module._parameters, module._buffers):
                for name, tensor in registry.items():
                    if tensor is None or id(tensor) not in earlier:
                        continue
                    if id(tensor) not in copies:
                        new = tensor.detach().clone()
                        if isinstance(tensor, nn.Parameter):
                            new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                            new.__dict__.update(tensor.__dict__)  # megatron's sharding markers
                        copies[id(tensor)] = new
                        copied += tensor.numel() * tensor.element_size()
                    registry[name] = copies[id(tensor)]
        for module in layer.modules():
            earlier.update(id(t) for registry in (module._parameters, module._buffers) for t in registry.values() if t is not None)
    replication.materialized = True
    return copied
