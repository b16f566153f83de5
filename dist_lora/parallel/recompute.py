"""Activation recompute for megatron models with LoRA: megatron's own settings, plus the one
thing a frozen base needs.

    none       keep every activation
    selective  recompute core attention (the s×s part) in backward
    full       keep only each layer's input; rerun the layer (LoRA included) in backward

megatron's full recompute is an autograd function over the layer's input; with a frozen base
the embedding output does not require grad, so backward would never reach the layers (PyTorch:
"element 0 of tensors does not require grad"). :func:`inputs_require_grad` marks that output as
requiring grad (what transformers' ``enable_input_require_grads`` does for HF models); no
parameter of the embedding becomes trainable.
"""

from __future__ import annotations

from typing import Any

import torch

RECOMPUTE: dict[str, dict[str, Any]] = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def recompute_settings(kind: str) -> dict[str, Any]:
    """megatron ``TransformerConfig`` fields for ``kind`` (none | selective | full)."""
    if kind not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {kind!r}.")
    return dict(RECOMPUTE[kind])


def inputs_require_grad(model: torch.nn.Module) -> list:
    """Make the output of every ``embedding`` submodule of a megatron model require grad, so
    that full recompute of the first layer has something to differentiate; returns the hooks."""
    hooks = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "embedding":
            hooks.append(module.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    return hooks
