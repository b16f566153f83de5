"""EVA's rank redistribution and the config it writes.

Budget and candidates: every target layer l has its configured rank r_l (``rank_pattern`` or
``r``); the budget is R = Σ_l r_l, and layer l may receive up to k_l = round(rho · r_l)
components (layers sharing one input share one PCA, whose k is the largest of theirs).

Rule: pool the explained-variance ratios λ_{l,1..k_l} of every layer (a layer that shares its
input with another contributes its PCA's ratios again), sort them in decreasing order and give
each of the top R values to its layer: rank_l = #{j : λ_{l,j} among the top R}. Ties keep the
pooling order (a stable sort): layers that compute their own PCA first, in module order, then
the layers sharing another layer's input, so the layer that carries a shared PCA never gets
fewer components than the layers sharing it. A layer can get 0 (then it gets no adapter) and
at most k_l. The ranks sum to R (when at least R ratios exist).

Scaling: with ``adjust_scaling_factors`` a layer whose rank changes from r_l to r'_l gets
alpha'_l = alpha_l · r'_l / r_l, so that alpha / r (the LoRA scaling) is unchanged.
"""

from __future__ import annotations

from collections import Counter

import torch


def redistribute_ranks(order: list[str], ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """New rank per layer: ``order`` the pooling order, ``ratios[layer]`` its (PCA's) explained
    variance ratios (at most k_l of them), ``budget`` R."""
    values = torch.cat([ratios[name].to(torch.float64).reshape(-1) for name in order])
    owners = [name for name in order for _ in range(ratios[name].numel())]
    top = torch.sort(values, descending=True, stable=True).indices[:budget]
    counts = Counter(owners[i] for i in top.tolist())
    return {name: counts.get(name, 0) for name in order}


def scaled_alpha(alpha: float, old_rank: int, new_rank: int, adjust: bool) -> float:
    """alpha · new/old with ``adjust_scaling_factors`` (the scaling alpha/r is kept), else alpha."""
    return alpha * new_rank / old_rank if adjust and new_rank != old_rank else alpha
