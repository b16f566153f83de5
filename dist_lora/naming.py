"""Module names that do not depend on the parallel layout.

Under pipeline parallelism a megatron stage numbers its layers locally (``decoder.layers.0``
on stage 1 may be global layer 12). Seeds and checkpoint keys use the global name, read from
each ``TransformerLayer.layer_number`` (1-based, global), so every layout agrees on them.
"""

from __future__ import annotations

from torch import nn


def global_module_name(model: nn.Module, name: str) -> str:
    """``name`` with every local layer index replaced by the layer's global index."""
    module, parts = model, []
    for part in name.split("."):
        module = getattr(module, part)
        number = getattr(module, "layer_number", None)
        if part.isdigit() and isinstance(number, int):
            part = str(number - 1)
        parts.append(part)
    return ".".join(parts)
