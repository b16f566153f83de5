"""The adapter math, in one place. Every layer type (plain, Conv1D, column/row parallel)
calls these functions; none re-derives them.

A LoRA adapter adds a low-rank update to a frozen linear map W ∈ R^{out×in}:

    y = W x + s · B (A · dropout(x)),      A ∈ R^{r×in},  B ∈ R^{out×r}
    s = alpha / r            (LoRA)
    s = alpha / sqrt(r)      (rank-stabilised LoRA, use_rslora=True)

so the merged weight is W' = W + ΔW with ΔW = s · B A. With lora_bias, B has a bias b and
the adapter output is s · (B h + b): the bias is scaled like the rest (PEFT's convention), and
merging adds s · b to the base bias. :func:`merged_weight` / :func:`merged_bias` are the one
home of the merged values (DoRA's row rescale included): layers merge with them, ``safe_merge``
checks exactly what they return, and the merged export writes them.

The scale is applied to the r-sized intermediate h = A x (r ≪ out), never to an out-sized tensor.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import InitValue



def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def init_seed(base_seed: int, module_name: str, adapter_name: str) -> int:
    """A stable per-(module, adapter) seed, identical on every rank and process
    (Python's ``hash`` is salted per process, so it cannot be used)."""
    digest = hashlib.sha256(f"{base_seed}/{module_name}/{adapter_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_lora_factors(
    r: int,
    in_features: int,
    out_features: int,
    init: InitValue,
    seed: int,
    lora_bias: bool = False,
    stack: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Full (unsharded) fp32 factors A [r, in], B [out, r] and B's bias, from one seed.

    Parallel layers slice these, so a TP=t model starts from exactly the TP=1 adapter.
      True       A ~ kaiming-uniform(a=√5) (bound 1/√in), B = 0    (PEFT's default)
      "gaussian" A ~ N(0, 1/r),                            B = 0
      False      A and B as nn.Linear's default init (the update is not zero)
    ``stack`` > 1: ``stack`` adapters of rank r stacked along the rank (A [r·stack, in],
    B [out, r·stack], :mod:`dist_lora.expert_layout`), drawn as PEFT draws them (one tensor each,
    the gaussian std still 1/r).
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.empty(r * stack, in_features)
    b = torch.zeros(out_features, r * stack)
    bias = torch.zeros(out_features) if lora_bias else None
    if init == "gaussian":
        torch.nn.init.normal_(a, std=1.0 / r, generator=gen)
    else:
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    if init is False:
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
        if bias is not None:
            bound = 1.0 / math.sqrt(r)
            torch.nn.init.uniform_(bias, -bound, bound, generator=gen)
    return a, b, bias


def in_compute_dtype(factor: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """A factor as the LoRA products use it: in the layer input's dtype.

    Mixed precision: a bf16/fp16 base computes its LoRA products in bf16/fp16 too, while the
    factors themselves stay fp32 masters (their gradients come back in fp32 through the cast)."""
    return None if factor is None else factor.to(x.dtype)


def lora_down(x: torch.Tensor, a: torch.Tensor, scaling: float, dropout: torch.nn.Module) -> torch.Tensor:
    """h = s · A · dropout(x), the r-sized intermediate (scaled here, where it is cheapest),
    in x's dtype (:func:`in_compute_dtype`)."""
    return F.linear(dropout(x), in_compute_dtype(a, x)) * scaling


def scaled_bias(bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · b, the adapter's bias as added to the output (and merged into the base bias)."""
    return bias * scaling


def lora_up(h: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    """B h (+ s · b): completes s · (B A x + b) given h = s · A x (in h's dtype, see :func:`lora_down`)."""
    return F.linear(h, in_compute_dtype(b, h), None if bias is None else in_compute_dtype(scaled_bias(bias, scaling), h))


def delta_weight(
    a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """ΔW = s · B A in fp32, transposed for fan_in_fan_out (Conv1D) weights.

    On shards this is still exact: column-parallel B_i A gives rows i of ΔW,
    row-parallel B A_i gives columns i of ΔW, matching the local base weight shard.
    """
    delta = (b.float() @ a.float()) * scaling
    return delta.T if fan_in_fan_out else delta


# --- DoRA (weight-decomposed LoRA) -----------------------------------------------------------
#
# DoRA learns a magnitude vector m [out] on top of LoRA:
#     W' = m / ||W + ΔW||_row · (W + ΔW),     ||·||_row: the L2 norm of each output row
# The norm is treated as a constant (detached, as in the paper and PEFT), so in forward
#     y = base(x) + (m/n - 1) · (W x_d) + (m/n) · s · B A x_d,     x_d = dropout(x), n = ||W + ΔW||_row
# where W x_d is the base output without its bias (x_d = x without dropout).
# Sharded: a column-parallel shard holds whole rows (its norm is local); a row-parallel shard
# holds column blocks, so n² = Σ_i ||W_i + s·B·A_i||²_row is summed over TP.


def dora_norm_sq(weight: torch.Tensor, delta: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Σ_in (W + ΔW)² per output row, in fp32 (ΔW as :func:`delta_weight` returns it)."""
    full = weight.float() + delta
    return full.pow(2).sum(dim=0 if fan_in_fan_out else 1)


def dora_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ||W + ΔW||_row with the norm detached (no gradient through it)."""
    return magnitude / norm.detach().to(magnitude.dtype)


def dora_output(base_nobias: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What DoRA adds to the base output: (m/n - 1) · W x_d + (m/n) · s · B A x_d."""
    scale = scale.to(lora_out.dtype)
    return (scale - 1) * base_nobias.to(lora_out.dtype) + scale * lora_out


# --- merged values ---------------------------------------------------------------------------
#
# Merging adapters k = 1..K in order into W (fp32 throughout, cast back to W's dtype once):
#     W ← W + ΔW_k,  then for a DoRA adapter  W ← (m_k / ||W0 + ΔW_k||_row) ⊙_row W
# with W0 the base weight without any merged adapter (the norm forward uses; PEFT merges the
# same way). Unmerging undoes the steps last first. The bias: b' = b + Σ_k s_k · b_k.


def _per_row(scale: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``scale`` [out] shaped to broadcast over the output rows of a weight (columns for fan_in_fan_out)."""
    return scale[None, :] if fan_in_fan_out else scale[:, None]


def dora_merge_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The fp32 row rescale m / ||W0 + ΔW||_row a DoRA merge applies (no gradient)."""
    return dora_scale(magnitude.detach().float(), norm)


MergeStep = tuple[torch.Tensor, Optional[torch.Tensor]]  # (ΔW as delta_weight returns it, DoRA row scale or None)


def merged_weight(weight: torch.Tensor, steps: Iterable[MergeStep], fan_in_fan_out: bool = False) -> torch.Tensor:
    """W' in fp32: for each adapter in order W ← W + ΔW, then (DoRA) W ← scale ⊙_row W with the
    scale from :func:`dora_merge_scale`. ``steps`` may be a generator (one ΔW at a time)."""
    new = weight.float()
    for delta, scale in steps:
        new = new + delta
        if scale is not None:
            new = new * _per_row(scale, fan_in_fan_out)
    return new


def unmerged_weight(weight: torch.Tensor, steps: Iterable[MergeStep], fan_in_fan_out: bool = False) -> torch.Tensor:
    """The inverse of :func:`merged_weight` in fp32, undoing ``steps`` in the order given (so
    pass them last merged first)."""
    new = weight.float()
    for delta, scale in steps:
        if scale is not None:
            new = new / _per_row(scale, fan_in_fan_out)
        new = new - delta
    return new


def merged_bias(bias: torch.Tensor, scaled_biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """b' = b + Σ s·b_k in fp32 (``scaled_biases``: :func:`scaled_bias` of each adapter's bias)."""
    return bias.float() + sum(b.float() for b in scaled_biases)


def unmerged_bias(bias: torch.Tensor, scaled_biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`merged_bias`, in fp32."""
    return bias.float() - sum(b.float() for b in scaled_biases)


def non_finite(values: dict[str, Optional[torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor in ``values`` with a NaN or Inf (None values skipped), or None."""
    return next((name for name, t in values.items() if t is not None and not torch.isfinite(t).all()), None)
