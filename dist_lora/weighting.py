"""``add_weighted_adapter``: a new adapter made from a weighted combination of existing ones.

The math runs per module on the FULL factors (the TP=1 layout): each source adapter's shards
are all-gathered over the layer's TP group, the new full factors are computed identically on
every rank, and each rank keeps its own slice (``shard_a`` / ``shard_b``). So the result does
not depend on the parallel layout, and replicated factors are bit-identical on all TP ranks.
Random masks (DARE) are drawn on the CPU from a generator seeded from (seed, global module
name, new adapter, source adapter, factor), so every rank and every TP size draws the same.

Notation: source i has factors A_i [r_i, in], B_i [out, r_i], scale s_i (alpha_i/r_i, or
alpha_i/sqrt(r_i) with rsLoRA) and weight w_i, so its update is ΔW_i = s_i B_i A_i.

Every new adapter has scale s_new = 1: ``use_rslora=False`` and ``lora_alpha == r`` (per
module, via matching ``rank_pattern`` / ``alpha_pattern`` keys), so ΔW_new = B_new A_new.

  cat        A_new = [w_1 s_1 A_1; w_2 s_2 A_2; ...; 0],  B_new = [B_1, B_2, ..., 0]
             rank R = Σ_i max rank of adapter i (as PEFT; zero-padded where a module has less)
             exact: ΔW_new = Σ w_i ΔW_i.
  *_svd, svd ΔW = merge(ΔW_1..ΔW_n; w) in fp32 (merge = weighted sum for svd, else as named),
             U S Vh = svd(ΔW), B_new = U_k S_k, A_new = Vh_k (optionally quantile-clamped),
             k = svd_rank or the largest source rank; exact when k ≥ rank(ΔW) and no clamp.
  linear, ties, dare_linear, dare_ties, magnitude_prune   (PEFT's factor-space semantics)
             each factor merged separately with weights sqrt(|w_i s_i|) (the sign of w_i s_i
             goes on A): A_new = merge(A_i; sign·sqrt|w_i s_i|), B_new = merge(B_i; sqrt|w_i s_i|).
             Needs the same rank and the same target modules for all sources. Only an
             approximation of Σ w_i ΔW_i (exact for one source).

merge (``peft.utils.merge_utils`` semantics, on the full tensors t_i):
  linear           Σ w_i t_i
  magnitude_prune  Σ w_i top_density(t_i)                   (keep the int(density·numel) largest |t|)
  ties             disjoint_merge(w_i top_density(t_i))     (elect the sign from the unweighted
                                                             pruned tensors: 'total' = sign of Σ t,
                                                             'frequency' = sign of Σ sign(t); average
                                                             the weighted entries agreeing with it)
  dare_linear      Σ w_i bernoulli_density(t_i) / density
  dare_ties        disjoint_merge(w_i bernoulli_density(t_i) / density)
density ≥ 1 prunes nothing; density 0 prunes everything (DARE gives zeros, not 0/0).

With a single source adapter every type is 'linear' (as PEFT).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .layers import math as lm
from .naming import global_module_name
from .parallel import tp

if TYPE_CHECKING:
    from .layers.base import LoraLayer
    from .model import LoraModel

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
                     "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")
MAJORITY_SIGN_METHODS = ("total", "frequency")


# --- merging task tensors (peft.utils.merge_utils semantics) ---------------------------------


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def random_prune_tensor(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by 1/density.
    The mask is drawn on the CPU from ``generator`` (so it is the same on every device and rank)."""
    if density >= 1:
        return t
    if density <= 0:
        return torch.zeros_like(t)
    mask = torch.bernoulli(torch.full(t.shape, float(density)), generator=generator)
    return t * mask.to(device=t.device, dtype=t.dtype) / density


def _disjoint_merge(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(magnitude >= 0, 1.0, -1.0).to(sign.dtype)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def merge_tensors(
    kind: str,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    generators: Optional[Sequence[torch.Generator]] = None,
) -> torch.Tensor:
    """Merge ``tensors`` by ``kind`` (linear, ties, dare_linear, dare_ties, magnitude_prune)."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_tensor(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune_tensor(t, density, g) for t, g in zip(tensors, generators)]
    elif kind != "linear":
        raise ValueError(f"unknown merge kind {kind!r}.")
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if kind in ("ties", "dare_ties"):
        return _disjoint_merge(stacked, w, majority_sign_method)
    return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)


# --- validation --------------------------------------------------------------------------


def _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_driver,
                     density, majority_sign_method) -> None:
    adapters = list(adapters)
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one source adapter.")
    missing = [a for a in adapters if a not in model.peft_config]
    if missing:
        raise ValueError(f"unknown adapter(s) {missing}; existing: {sorted(model.peft_config)}.")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters must be distinct, got {adapters}.")
    with_parameters = [a for a in adapters if model.peft_config[a].target_parameters]
    if with_parameters:  # as PEFT
        raise ValueError(f"add_weighted_adapter does not support target_parameters (adapters {with_parameters}).")
    if len(list(weights)) != len(adapters):
        raise ValueError(f"got {len(list(weights))} weights for {len(adapters)} adapters; give one weight per adapter.")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights must be finite numbers, got {list(weights)}.")
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; choose one of {list(COMBINATION_TYPES)}.")
    if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                or not 0.0 <= density <= 1.0):
        raise ValueError(f"density must be a number in [0, 1], got {density!r}.")
    uses_density = combination_type not in ("svd", "linear", "cat")
    if uses_density and density is None and len(adapters) > 1:
        raise ValueError(f"combination_type {combination_type!r} needs density (a number in [0, 1]).")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {list(MAJORITY_SIGN_METHODS)}, got {majority_sign_method!r}.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be an integer >= 1 (or None for the largest source rank), got {svd_rank!r}.")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0.0 <= svd_clamp <= 1.0):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1] (or None), got {svd_clamp!r}.")
    if svd_driver not in SVD_DRIVERS:
        raise ValueError(f"svd_driver must be one of {list(SVD_DRIVERS)}, got {svd_driver!r}.")
    for a in adapters:
        config = model.peft_config[a]
        if config.lora_bias:
            raise NotImplementedError(f"add_weighted_adapter does not support lora_bias adapters ({a!r}).")
        if config.use_dora:  # a sum of ΔW's has no single magnitude vector
            raise NotImplementedError(f"add_weighted_adapter does not support DoRA adapters ({a!r}).")
        if config.modules_to_save:
            raise NotImplementedError(
                f"add_weighted_adapter does not combine modules_to_save (adapter {a!r} has {config.modules_to_save})."
            )


def _max_rank(config) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _union_targets(configs):
    targets = [c.target_modules for c in configs]
    if all(t is None for t in targets):
        return None
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets) if len(set(targets)) > 1 else targets[0]
    if all(isinstance(t, list) for t in targets):
        return sorted(set().union(*targets))
    raise ValueError(
        "all source adapters must give target_modules the same way (all lists or all regex strings); "
        f"got {targets}."
    )


def _new_config(model, adapters, combination_type, svd_rank):
    configs = [model.peft_config[a] for a in adapters]
    new = copy.deepcopy(configs[0])
    new.target_modules = _union_targets(configs)
    new.use_rslora = False
    if combination_type in FACTOR_TYPES:  # same ranks as the sources, alpha = r: s_new = 1
        new.alpha_pattern = dict(new.rank_pattern)
        new.lora_alpha = new.r
        return new
    rank = sum(_max_rank(c) for c in configs) if combination_type == "cat" else (svd_rank or max(map(_max_rank, configs)))
    new.r, new.lora_alpha, new.rank_pattern, new.alpha_pattern = rank, rank, {}, {}
    return new


# --- per-module math ---------------------------------------------------------------------


def _full_factor(layer: "LoraLayer", param: torch.Tensor) -> torch.Tensor:
    """The full (TP=1-layout) fp32 factor from this rank's shard."""
    t = param.detach().float()
    if not getattr(param, "tensor_model_parallel", False) or getattr(layer, "tp_size", 1) == 1:
        return t
    return tp.gather_full(t, param.partition_dim, layer.tp_group, tp.partition_stride(param))


def _combine_module(sources, weights, combination_type, rank, density, majority_sign_method, svd_clamp,
                    svd_full_matrices, svd_driver, generator_for):
    """The new full factors (A [rank, in], B [out, rank]) of one module, with s_new = 1.
    ``sources``: list of (name, A, B, scaling)."""
    if combination_type == "cat":
        a_new = torch.cat([a * (w * s) for (_, a, _, s), w in zip(sources, weights)])
        b_new = torch.cat([b for _, _, b, _ in sources], dim=1)
        return _pad(a_new, b_new, rank)
    if combination_type in FACTOR_TYPES:
        ws = [w * s for (_, _, _, s), w in zip(sources, weights)]
        w_a = [math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0 for x in ws]
        w_b = [math.sqrt(abs(x)) for x in ws]
        names = [n for n, _, _, _ in sources]
        a_new = merge_tensors(combination_type, [a for _, a, _, _ in sources], w_a, density, majority_sign_method,
                              [generator_for(n, "lora_A") for n in names])
        b_new = merge_tensors(combination_type, [b for _, _, b, _ in sources], w_b, density, majority_sign_method,
                              [generator_for(n, "lora_B") for n in names])
        return a_new, b_new
    deltas = [(b @ a) * s for _, a, b, s in sources]
    kind = "linear" if combination_type == "svd" else combination_type[: -len("_svd")]
    delta = merge_tensors(kind, deltas, weights, density, majority_sign_method,
                          [generator_for(n, "delta") for n, _, _, _ in sources])
    u, s, vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
    k = min(rank, s.numel())
    b_new, a_new = u[:, :k] * s[:k], vh[:k]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([b_new.flatten(), a_new.flatten()]), svd_clamp)
        b_new, a_new = b_new.clamp(-hi, hi), a_new.clamp(-hi, hi)
    return _pad(a_new, b_new, rank)


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A / columns of B up to ``rank`` (they add nothing to B A)."""
    extra = rank - a.shape[0]
    if extra > 0:
        a = torch.cat([a, a.new_zeros(extra, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    return a.contiguous(), b.contiguous()


# --- the model-level operation -----------------------------------------------------------


@torch.no_grad()
def add_weighted_adapter(
    model: "LoraModel",
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[int] = None,
    svd_clamp: Optional[float] = None,
    svd_full_matrices: bool = True,
    svd_driver: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    seed: Optional[int] = None,
) -> None:
    """Add adapter ``adapter_name`` combining ``adapters`` with ``weights``; see the module
    docstring. Collective over each layer's TP group (call it on every rank). The new adapter
    is not made active (as PEFT). ``seed`` (default: the model's adapter-init seed) seeds the
    DARE masks."""
    adapters, weights = list(adapters), list(weights)
    _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_driver,
                     density, majority_sign_method)
    weights = [float(w) for w in weights]
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: one source, one exact result
    config = _new_config(model, adapters, combination_type, svd_rank)
    base_seed = model.adapter_seed if seed is None else int(seed)

    layers = list(model.lora_layers())
    plans = []
    for name, layer in layers:  # check every module before anything is gathered or changed
        present = [a for a in adapters if a in layer.lora_A]
        if not present:
            continue
        if combination_type in FACTOR_TYPES:
            if len(present) != len(adapters):
                raise ValueError(
                    f"combination_type {combination_type!r} needs every adapter on the same modules, but {name} has "
                    f"only {present} of {adapters}; use 'cat' or an SVD type."
                )
            ranks = {a: layer.r[a] for a in adapters}
            if len(set(ranks.values())) != 1:
                raise ValueError(
                    f"combination_type {combination_type!r} needs adapters of the same rank, but {name} has ranks "
                    f"{ranks}; use 'cat' or an SVD type."
                )
        for a in present:
            if layer.lora_A[a].weight.is_meta:
                raise ValueError(f"adapter {a!r} of {name} has no weights yet (meta tensors); load it first.")
        plans.append((name, layer, present))

    results = []
    for name, layer, present in plans:
        gname = global_module_name(model.model, name)
        sources = [
            (a, _full_factor(layer, layer.lora_A[a].weight), _full_factor(layer, layer.lora_B[a].weight), layer.scaling[a])
            for a in present
        ]
        src_weights = [weights[adapters.index(a)] for a in present]

        def generator_for(source: str, factor: str, _gname: str = gname) -> torch.Generator:
            tag = f"add_weighted_adapter/{adapter_name}/{combination_type}/{source}/{factor}"
            return torch.Generator().manual_seed(lm.init_seed(base_seed, _gname, tag))

        rank = config.rank_for(gname)
        if combination_type in FACTOR_TYPES and rank != layer.r[present[0]]:
            raise ValueError(
                f"{name} has rank {layer.r[present[0]]} but the config of {adapters[0]!r} gives {rank}; "
                f"cannot describe the combined adapter; use 'cat' or an SVD type."
            )
        a_new, b_new = _combine_module(sources, src_weights, combination_type, rank, density, majority_sign_method,
                                       svd_clamp, svd_full_matrices, svd_driver, generator_for)
        results.append((layer, rank, config.alpha_for(gname), a_new, b_new))

    for layer, rank, alpha, a_new, b_new in results:
        layer.update_layer(adapter_name, r=rank, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                           init_lora_weights=True, use_rslora=False, seed=0)
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        lora_a.copy_(layer.shard_a(a_new).to(lora_a.dtype))
        lora_b.copy_(layer.shard_b(b_new).to(lora_b.dtype))
        assert layer.scaling[adapter_name] == 1.0, "the new adapter's scale must be 1"
    model.peft_config[adapter_name] = config
    model.mark_trainable()
