"""The layer stack of a merged export whose adapter was trained with ``layer_replication``.

Replication (:mod:`dist_lora.replication`) runs original layer ``source[j]`` at position j of
an expanded stack of K layers, each position with an adapter of its own. The merged model is
therefore the dense expanded model: output tensor ``<stack>.j.<rest>`` is base tensor
``<stack>.source[j].<rest>`` (with position j's adapter merged by the caller), base layers that
no position uses are left out, every other tensor is the base's; ``config.json`` counts K layers
and gets the per-layer lists expanded, exactly as :func:`~dist_lora.replication.replicate_layers`
changes the config of a live model.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable

from ..config import ConfigError
from ..replication import replicate_layers
from .errors import ConsolidationError
from .hf_model import meta_model


class LayerExpansionError(ConsolidationError):
    """The base model cannot be expanded as the adapter's layer_replication asks."""


@dataclasses.dataclass(frozen=True)
class LayerExpansion:
    """Which base tensor each output tensor comes from, and the config.json changes."""

    ranges: list[list[int]]
    source: list[int]  # base layer of each position
    stack_prefix: str  # "model.layers." for Llama / Qwen2 / Qwen3
    base_layers: int  # layers of the base model
    config_changes: dict[str, Any]  # config.json key -> expanded value

    def tensor_sources(self, base_names: Iterable[str]) -> list[tuple[str, str]]:
        """(output name, base name) of every output tensor: the non-layer tensors in the
        checkpoint's order, then each position's layer tensors. Raises when the checkpoint
        has no tensor of the layer stack or one of a layer the config does not have."""
        others, layers = [], [[] for _ in range(self.base_layers)]
        pattern = re.compile(re.escape(self.stack_prefix) + r"(\d+)\.(.+)")
        for name in base_names:
            match = pattern.fullmatch(name)
            if match is None:
                others.append((name, name))
                continue
            index = int(match[1])
            if index >= self.base_layers:
                raise LayerExpansionError(
                    f"--hf-model: the checkpoint has {name}, but its config.json has only "
                    f"{self.base_layers} layers; the model directory is inconsistent."
                )
            layers[index].append(match[2])
        if not any(layers):
            raise LayerExpansionError(
                f"--hf-model: no tensor of the layer stack {self.stack_prefix}N.* in the checkpoint; cannot "
                f"expand it for layer_replication={self.ranges}."
            )
        expanded = [(f"{self.stack_prefix}{j}.{rest}", f"{self.stack_prefix}{i}.{rest}")
                    for j, i in enumerate(self.source) for rest in layers[i]]
        return others + expanded

    def write_config(self, config_path: str) -> None:
        """Rewrite the copied ``config.json`` with the expanded layer count and lists."""
        with open(config_path) as f:
            config = json.load(f)
        config.update(self.config_changes)
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def layer_expansion(hf_model_dir: str, ranges: list[list[int]]) -> LayerExpansion:
    """The :class:`LayerExpansion` of the HF model in ``hf_model_dir`` (its config only, on the
    meta device) for ``layer_replication=ranges``."""
    model = meta_model(hf_model_dir)
    try:
        replication = replicate_layers(model, ranges)
    except (ConfigError, NotImplementedError) as e:
        raise LayerExpansionError(f"the HF model at {hf_model_dir} does not fit the checkpoint's {e}") from None
    config = model.config
    names = type(config).attribute_map  # e.g. GPT-2 stores num_hidden_layers as n_layer
    changes = {names.get(key, key): getattr(config, key) for key in replication.original_config}
    count_key = names.get("num_hidden_layers", "num_hidden_layers")
    if count_key not in changes:
        raise LayerExpansionError(f"{hf_model_dir}/config.json has no layer count ({count_key}) to expand.")
    return LayerExpansion(replication.ranges, replication.source, replication.stack_name + ".",
                          len(replication.original_layers), changes)
