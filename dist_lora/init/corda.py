"""CorDA: adapters from the SVD of the weight times the input covariance (PEFT's ``corda``,
peft/tuners/lora/corda.py; paper https://huggingface.co/papers/2406.05223).

The formulas (W [out, in], s the adapter's scaling, k = min(out, in)):

  data pass     per forward call, X = the layer's input as [tokens, in], X̂ = X / |max(X)|,
                C = (Σ_calls X̂ᵀX̂) / calls                                       (in × in)
  damping       Ĉ = C + d·mean(diag C)·I, d = 0.01, doubled until ||Ĉ Ĉ⁻¹ - I||_F < 0.05
                (the test is run in fp32, as PEFT does, so the same d is chosen)
  decomposition W Ĉ = U S Vh (thin, k values),   V_WC = (Vh Ĉ⁻¹)ᵀ               (in × k)
  ranks         "ipm" keeps the r largest singular values, "kpm" the r smallest of the k
  adapter       A = sqrt(S_r/s) V_WC,rᵀ [r, in],  B = U_r sqrt(S_r/s) [out, r],
                base weight W ← W - s·B·A   (= W - U_r S_r Vh_r Ĉ⁻¹)

:func:`preprocess_corda` runs the data pass (or reads ``covariance_file`` / ``cache_file``),
computes (U_r, S_r, V_WC,r) for every target and leaves them on the target module as
``corda_eigens``; :func:`get_lora_model` with ``init_lora_weights="corda"`` then builds the
adapters from them (no further communication) and removes them.

Tensor parallelism (megatron activations are [seq, batch, hidden]; tokens are flattened):

  column-parallel (W_i = rows of W; megatron's strided gated fc1 allowed; input replicated,
    or sequence-sharded under SP, when the per-rank covariances are summed over TP)
      C replicated (in × in). M_i = W_i Ĉ (local rows). G = MᵀM = Σ_i M_iᵀM_i (one in × in
      all-reduce); eigh(G) gives V_M, S; U_i = M_i V_M S⁻¹ (local); V_WC = Ĉ⁻¹ V_M (replicated).
      Memory per rank: C, Ĉ⁻¹ and G, in² fp64 each.
  row-parallel (W_i = columns of W; input feature-sharded x_i)
      data pass: each rank accumulates its row block C_i = X̂_iᵀ X̂ [in_i, in] (the call's
      input is all-gathered over TP, and |max| all-reduced); afterwards the blocks are
      all-gathered into C (in × in), replicated.
      M's column block j = Σ_i W_i Ĉ_ij is reduced onto rank j (t reduces of out × in_j, one
      block at a time). G = MMᵀ = Σ_j M_jM_jᵀ (one out × out all-reduce); eigh(G) gives U, S;
      Vh_j = S⁻¹ U_rᵀ M_j (local), all-gathered (r × in) to V_WC = (Vh_r Ĉ⁻¹)ᵀ, whose rows
      for block j are this rank's. Memory per rank: C and Ĉ⁻¹ in² fp64 each, G out² fp64,
      one out × in_j block in flight.
  Neither gathers the weight. The eigenvectors are broadcast from the TP group's first rank
  (deterministic signs, :func:`dist_lora.factors.weight_driven.eigen_range`), so replicated
  factors are bit-identical; the Gram route squares the condition number of W Ĉ, which for
  fp32 weights in fp64 costs nothing visible in the kept values (ipm) and little in the
  smallest k (kpm) unless W Ĉ is nearly singular.
  Data parallelism: covariances and call counts are summed over the data-parallel group.

Unsharded nn.Linear / Conv1D layers use PEFT's exact fp32 calls (torch.linalg.svd of W Ĉ).
The decomposition and the factors are in :mod:`dist_lora.factors.corda_math`; this module has
the data pass, the files and the entry point (the check that every target holds its data
before ``get_lora_model`` is :mod:`dist_lora.layers.init_checks`).

Files: ``covariance_file`` holds {module name: C}, ``cache_file`` holds
{"<module name>.eigens.S_WC" / "U_WC" / "V_WC": full (TP-gathered) tensors}, PEFT's keys, so a
file written at one TP size loads at any other. Written as safetensors when the name ends in
".safetensors", else with torch.save (PEFT's format); read only with safetensors or
``torch.load(weights_only=True)``. The module names are this library's global names (for a
Hugging Face model, the same as PEFT's).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError, CordaConfig, LoraConfig
from ..factors.checks import check_rank_fits
from ..factors.corda_math import CordaEigens, check_stored, dense_corda_eigens, sharded_corda_eigens
from ..io import atomic_path
from ..layers.kinds import LinearGeometry, base_module, linear_geometry
from ..naming import global_module_name
from ..parallel import tp, zero
from ..parallel.collectives import all_gather, all_reduce, broadcast_from_first, data_parallel_group
from ..parallel.setup import is_rank0, pipeline_group
from ..parallel.zero_forward import check_forward_ready
from ..targeting import find_targets

logger = logging.getLogger(__name__)

CORDA_METHODS = ("ipm", "kpm")


# --- layer geometry -------------------------------------------------------------------------


def _geometry(module: nn.Module) -> LinearGeometry:
    geometry = linear_geometry(module)
    if geometry.layout == "row" and geometry.stride != 1:
        raise NotImplementedError("CorDA on a strided row-parallel weight is not supported.")
    return geometry


# --- the data pass ----------------------------------------------------------------------------


class _Accumulator:
    """Sums X̂ᵀX̂ (or this rank's row block of it) over forward calls of one layer."""

    def __init__(self, geometry: LinearGeometry, half: bool) -> None:
        self.g = geometry
        self.half = half
        self.cov: Optional[torch.Tensor] = None
        self.count = 0

    def __call__(self, module: nn.Module, inputs: tuple, output) -> None:
        g = self.g
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1])
        width = g.in_features // g.size if g.layout == "row" else g.in_features
        if x.shape[-1] != width:
            raise NotImplementedError(
                f"CorDA data pass: the layer's input has {x.shape[-1]} features, expected {width} "
                "(a row-parallel layer needs input_is_parallel=True)."
            )
        if not (self.half and x.dtype in (torch.float16, torch.bfloat16)):
            x = x.float()
        # |max| over the whole call's input; a flag for non-finite input rides along so that
        # every rank of the group raises together (one alone would hang the others).
        stats = torch.stack([x.max().float(), (~torch.isfinite(x).all()).float()])
        stats = torch.nan_to_num(stats, nan=float("inf"))
        if g.layout == "row" or g.sequence_parallel:
            all_reduce(stats, g.group, op=dist.ReduceOp.MAX)
        if stats[1] > 0 or not torch.isfinite(stats[0]):
            raise ValueError("CorDA data pass: a layer's input holds NaN or Inf; check the calibration data.")
        x = x / stats[0].abs().to(x.dtype)
        if g.layout == "row" and g.size > 1:
            cov = x.t() @ torch.cat(all_gather(x, g.group), dim=1)  # [in_i, in]
        else:
            cov = x.t() @ x
        if not torch.isfinite(cov).all():
            raise ValueError("CorDA data pass: the covariance overflowed; use fp32 (use_float16_for_covariance=False).")
        self.cov = cov if self.cov is None else self.cov + cov
        self.count += 1

    def finish(self, name: str) -> torch.Tensor:
        """C (in × in), identical on every rank of the TP group."""
        g = self.g
        count = torch.tensor([float(self.count)])
        all_reduce(count, data_parallel_group())
        if count.item() == 0:
            raise ValueError(f"CorDA: {name!r} received no input during run_model; nothing to build its covariance from.")
        if self.cov is None:  # this data-parallel rank saw no data; the others did
            rows = g.in_features // g.size if g.layout == "row" else g.in_features
            self.cov = torch.zeros(rows, g.in_features)
        cov = self.cov.float() if data_parallel_group() is not None else self.cov  # sums over DP in fp32
        if g.layout == "row" and g.size > 1:
            cov = torch.cat(all_gather(cov, g.group), dim=0)
        elif g.sequence_parallel:
            all_reduce(cov, g.group)
        all_reduce(cov, data_parallel_group())
        cov = cov / count.item()
        return broadcast_from_first(cov.contiguous(), g.group)


def _collect_covariances(
    model: nn.Module, names: list[str], config: LoraConfig, run_model: Callable[[], None], hooked_model: Optional[nn.Module]
) -> dict[str, torch.Tensor]:
    corda = config.corda_config
    hooked = model if hooked_model is None else hooked_model
    hooked_names = {global_module_name(hooked, n): n for n in find_targets(hooked, config, allow_empty=True)}
    accumulators, handles = {}, []
    for name in names:
        key = global_module_name(model, name)
        if key not in hooked_names:
            raise ValueError(f"CorDA: hooked_model has no target module {key!r}; it must have the same target modules as model.")
        module = base_module(hooked.get_submodule(hooked_names[key]))
        acc = _Accumulator(_geometry(module), corda.use_float16_for_covariance)
        accumulators[key] = acc
        handles.append(module.register_forward_hook(acc))
    was_training = hooked.training
    hooked.eval()
    try:
        with torch.no_grad():
            run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(was_training)
    return {key: acc.finish(key) for key, acc in accumulators.items()}


# --- files ------------------------------------------------------------------------------------


def load_tensor_file(path: str, what: str) -> dict[str, torch.Tensor]:
    """A {name: tensor} file via safetensors, else ``torch.load(weights_only=True)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        data = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"CorDA {what} {path!r} could not be read as safetensors nor as a torch.save dict of tensors "
                f"(corrupt or not such a file): {exc}. Delete it to rebuild it."
            ) from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise ValueError(f"CorDA {what} {path!r} must hold a dict of name -> tensor, got {type(data).__name__}.")
    return data


def _save_tensor_file(path: str, data: dict[str, torch.Tensor]) -> None:
    """Gather every rank's entries on global rank 0 and write them there (atomically)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(data, parts, dst=0)
        if dist.get_rank() == 0:
            data = {k: v for part in parts for k, v in part.items()}
    if is_rank0():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp:
            if path.endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in data.items()}, tmp, metadata={"format": "pt"})
            else:
                torch.save(data, tmp)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _writes_shared_entries(g: LinearGeometry) -> bool:
    """Whether this rank contributes a layer's (replicated) entries to a file: TP rank 0 of
    data-parallel rank 0."""
    group = data_parallel_group()
    dp_rank = dist.get_rank(group) if group is not None else 0
    return g.rank == 0 and dp_rank == 0


def _existing(path: Optional[str]) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


# --- the entry point -------------------------------------------------------------------------


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Optional[Callable[[], None]] = None,
    hooked_model: Optional[nn.Module] = None,
) -> None:
    """Prepare CorDA for ``model``: afterwards ``get_lora_model(model, lora_config)`` with
    ``init_lora_weights="corda"`` builds the adapters.

    ``run_model()`` runs the model on calibration data (every rank, as in training); it may be
    None when ``corda_config.cache_file`` or ``covariance_file`` exists. ``hooked_model`` is
    run instead of ``model`` to collect the inputs (same target names). Every target module
    gets ``corda_eigens`` (this rank's shard; see the module docstring for the memory cost).
    Everything is validated before any module is touched.
    """
    corda = lora_config.corda_config or CordaConfig()
    if corda.corda_method not in CORDA_METHODS:
        raise ConfigError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {corda.corda_method!r}.")
    lora_config = _with_corda(lora_config, corda)
    names = find_targets(model, lora_config, allow_empty=_pipelined())
    keys = [global_module_name(model, n) for n in names]
    modules = [base_module(model.get_submodule(n)) for n in names]
    geometries = [_geometry(m) for m in modules]
    ranks = [lora_config.rank_for(k) for k in keys]
    for key, g, r in zip(keys, geometries, ranks):
        check_rank_fits(r, g.in_features, g.out_features, "corda", key)

    if _existing(corda.cache_file):
        cache = load_tensor_file(corda.cache_file, "cache_file")
        eigens = [_eigens_from_cache(cache, k, g, r) for k, g, r in zip(keys, geometries, ranks)]
    else:
        if _existing(corda.covariance_file):
            data = load_tensor_file(corda.covariance_file, "covariance_file")
            covs = [_covariance_from_file(data, k, g) for k, g in zip(keys, geometries)]
        elif run_model is None:
            raise ValueError(
                "CorDA needs a data pass: pass run_model (a callable that runs the model on calibration data), "
                "or set corda_config.covariance_file / cache_file to an existing file."
            )
        else:
            check_forward_ready(model if hooked_model is None else hooked_model, "CorDA data pass (preprocess_corda)")
            found = _collect_covariances(model, names, lora_config, run_model, hooked_model)
            covs = [found[k] for k in keys]
            if corda.covariance_file is not None:
                _save_tensor_file(
                    corda.covariance_file,
                    {k: c for k, c, g in zip(keys, covs, geometries) if _writes_shared_entries(g)},
                )
        eigens = []
        items = list(zip(keys, modules, geometries, ranks, covs))
        for key, module, g, r, cov in _progress(items, corda.verbose and is_rank0(), "CorDA decompositions"):
            with zero.gathered([module.weight]):  # ZeRO-3: the full weight, read only (collective)
                w = g.weight(module)
                if g.layout is None:
                    eigens.append(dense_corda_eigens(w, cov, r, corda.corda_method, key))
                else:
                    eigens.append(sharded_corda_eigens(w, cov, r, corda.corda_method, g.layout, g.group, g.rank, g.size, key))
        if corda.cache_file is not None:
            _save_tensor_file(corda.cache_file, _cache_entries(keys, geometries, eigens))
    for module, e in zip(modules, eigens):
        module.corda_eigens = e
    if is_rank0():
        logger.info("CorDA (%s): prepared %d target modules.", corda.corda_method, len(modules))


def _with_corda(config: LoraConfig, corda: CordaConfig) -> LoraConfig:
    if config.corda_config is corda:
        return config
    config = copy.copy(config)
    config.corda_config = corda
    return config


def _pipelined() -> bool:
    return pipeline_group() is not None


def _covariance_from_file(data: dict, key: str, g: LinearGeometry) -> torch.Tensor:
    if key not in data:
        raise ValueError(f"CorDA covariance_file has no entry for {key!r} (it has {sorted(data)[:8]}...); was it built for another model?")
    cov = data[key]
    check_stored(cov, (g.in_features, g.in_features), f"CorDA covariance_file entry {key!r}", "was it built for another model?")
    return cov.float()


def _eigens_from_cache(cache: dict, key: str, g: LinearGeometry, r: int) -> CordaEigens:
    want = {"U_WC": (g.out_features, r), "S_WC": (r,), "V_WC": (g.in_features, r)}
    full = {}
    for field, shape in want.items():
        name = f"{key}.eigens.{field}"
        if name not in cache:
            raise ValueError(f"CorDA cache_file has no {name!r}; was it built for another model?")
        t = cache[name]
        check_stored(t, shape, f"CorDA cache_file {name!r}", "was it built for another model or another rank r?")
        full[field] = t.float()
    u, v = full["U_WC"], full["V_WC"]
    if g.layout == "column":
        u = tp.shard(u, 0, g.rank, g.size, g.stride)
    elif g.layout == "row":
        v = tp.shard(v, 0, g.rank, g.size, 1)
    return CordaEigens(u.contiguous(), full["S_WC"].contiguous(), v.contiguous())


def _cache_entries(keys: list[str], geometries: list[LinearGeometry], eigens: list[CordaEigens]) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) U/S/V of this rank's layers, from the ranks that write them."""
    out = {}
    for key, g, e in zip(keys, geometries, eigens):
        u, v = e.u, e.v
        if g.layout == "column":
            u = tp.gather_full(u, 0, g.group, g.stride)
        elif g.layout == "row":
            v = tp.gather_full(v, 0, g.group, 1)
        if _writes_shared_entries(g):
            out.update({f"{key}.eigens.S_WC": e.s, f"{key}.eigens.U_WC": u, f"{key}.eigens.V_WC": v})
    return out


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc)
