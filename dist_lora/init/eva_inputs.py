"""EVA's default input handling: how a batch is run and which of a layer's input rows count.

Batches: a Hugging Face dict ({"input_ids", "attention_mask"?, "labels"?}, batch-first [b, s])
or a megatron-style batch: a dict with "tokens" (and "labels", "loss_mask", "position_ids",
"attention_mask" as dist_lora.train uses them) or a (tokens, labels) tuple as
dist_lora.data.PackedDataset.batch returns it, all [b, s]. Megatron activations are
sequence-first [s, b, h], so the token mask of a megatron-style batch is returned as [s, b].
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..config import EvaConfig, LoraConfig


def forward_fn_default(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for an HF dict; ``model(tokens, position_ids, attention_mask)`` for a
    megatron-style batch (position ids / attention mask None unless the dict gives them)."""
    if isinstance(inputs, Mapping) and "tokens" in inputs:
        return model(inputs["tokens"], position_ids=inputs.get("position_ids"), attention_mask=inputs.get("attention_mask"))
    if isinstance(inputs, (tuple, list)):
        return model(inputs[0], position_ids=None, attention_mask=None)
    return model(**inputs)


def prepare_model_inputs_fn_default(inputs: Any, peft_config: LoraConfig) -> torch.Tensor:
    """The bool mask of the tokens EVA uses, laid out like the model's activations ([b, s] for
    an HF batch, [s, b] for a megatron-style batch): the attention mask (a 2-D padding mask),
    the loss mask, and with ``use_label_mask`` the labels != ``label_mask_value``."""
    eva = peft_config.eva_config or EvaConfig()
    if isinstance(inputs, (tuple, list)):
        inputs = {"tokens": inputs[0], "labels": inputs[1] if len(inputs) > 1 else None}
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"the default prepare_model_inputs_fn needs a dict or a (tokens, labels) tuple, got {type(inputs).__name__}; "
            "pass prepare_model_inputs_fn (and prepare_layer_inputs_fn) for other batches."
        )
    ids = inputs.get("input_ids", inputs.get("tokens"))
    if ids is None:
        raise KeyError("the batch has neither 'input_ids' nor 'tokens'.")
    mask = torch.ones_like(ids, dtype=torch.bool)
    attention = inputs.get("attention_mask")
    if attention is not None and attention.ndim == 2:  # megatron's 4-D causal mask selects no tokens
        mask &= attention.bool()
    if inputs.get("loss_mask") is not None:
        mask &= inputs["loss_mask"].bool()
    if eva.use_label_mask and inputs.get("labels") is not None:
        mask &= inputs["labels"] != eva.label_mask_value
    return mask if "input_ids" in inputs else mask.t().contiguous()


def prepare_layer_inputs_fn_default(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """The rows of the layer input [..., features] selected by the mask (``model_input``, a bool
    tensor shaped like the input's leading dims), or all rows when there is no such mask."""
    if isinstance(layer_input, (tuple, list)):
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"layer {layer_name}: unsupported input type {type(layer_input).__name__}; pass prepare_layer_inputs_fn."
        )
    if isinstance(model_input, torch.Tensor) and model_input.dtype == torch.bool:
        if tuple(model_input.shape) != tuple(layer_input.shape[:-1]):
            raise ValueError(
                f"layer {layer_name}: the token mask {tuple(model_input.shape)} does not match the input "
                f"{tuple(layer_input.shape)}; megatron inputs are [seq, batch, hidden]: give megatron-style "
                "batches ('tokens' or a (tokens, labels) tuple) so that the mask is [seq, batch]."
            )
        return layer_input[model_input]
    return layer_input.reshape(-1, layer_input.shape[-1])
