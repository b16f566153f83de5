"""Model FLOPs of a LoRA training step, per token, and model FLOPs utilisation (MFU).

Counted (a multiply-add is 2 FLOPs), for a decoder of L layers, hidden h, n query heads and g
key/value groups of head size d, MLP width f (gated: two input projections), vocabulary V,
sequence length s, and P_lora adapter parameters (r·(in + out) per adapted linear):

    frozen linears  P_lin = L·(h·(n + 2g)·d + n·d·h + (2 if gated else 1)·h·f + f·h) + V·h
                    forward 2·P_lin + input-gradient backward 2·P_lin (no weight gradient: frozen)
    attention       forward 4·L·s·n·d (q·kᵀ and p·v, every key counted: PaLM's convention,
                    no causal halving), backward twice that
    LoRA            forward 2·P_lora, input gradient 2·P_lora, weight gradient 2·P_lora

    flops/token = 4·P_lin + 12·L·s·n·d + 6·P_lora

Recompute is not counted (it is work the model does not need: "model" FLOPs), so MFU does not
rise when activations are recomputed. MFU = flops/token × tokens/s ÷ (peak FLOP/s × devices).
"""

from __future__ import annotations

from typing import Optional


def frozen_linear_params(layers: int, hidden: int, ffn: int, heads: int, groups: int, head_dim: int, vocab: int,
                         gated: bool = True) -> int:
    """P_lin of the docstring: the weights of every linear map of the model (the output layer too)."""
    per_layer = hidden * (heads + 2 * groups) * head_dim + heads * head_dim * hidden
    per_layer += (2 if gated else 1) * hidden * ffn + ffn * hidden
    return layers * per_layer + vocab * hidden


def flops_per_token(layers: int, hidden: int, ffn: int, heads: int, groups: int, head_dim: int, vocab: int, seq: int,
                    lora_params: int, gated: bool = True) -> int:
    """Model FLOPs of one trained token (forward and backward), by the module docstring's formula."""
    linear = frozen_linear_params(layers, hidden, ffn, heads, groups, head_dim, vocab, gated)
    return 4 * linear + 12 * layers * seq * heads * head_dim + 6 * lora_params


def mfu(flops_per_token_: int, tokens_per_s: float, peak_tflops: Optional[float], devices: int) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1]; None without a peak (e.g. on CPU)."""
    if not peak_tflops:
        return None
    return flops_per_token_ * tokens_per_s / (peak_tflops * 1e12 * devices)
