"""EVA (explained variance adaptation): LoRA's A from the principal components of each target
layer's inputs, with ranks redistributed by explained variance. PEFT's API and semantics
(``peft.tuners.lora.eva``), on Hugging Face models and on megatron tensor/sequence/data
parallel models.

    model = get_lora_model(base, LoraConfig(r=8, init_lora_weights="eva", eva_config=EvaConfig()))
    initialize_lora_eva_weights(model, dataloader)

What happens (the math of each step is in the module named):
1. One forward of the first batch with the adapters disabled; each target layer's masked input
   is hashed (sha256 of this rank's bytes; layers whose inputs are equal on EVERY rank share
   one PCA: q/k/v or gate/up of an HF model). Every rank learns every rank's hashes, so all
   agree on the groups.
2. Each PCA group gets an owner among the TP×DP ranks (largest input first, to the least
   loaded rank: the PCA work is divided, not repeated on every rank). Whenever the set of
   groups still open changes (one converged, or was reopened), the open ones are divided
   again and a moved group's PCA state travels with it, exactly (``_Run.rebalance``).
3. Batches (the dataloader, cycled): a forward with hooks on the groups that have not converged;
   each hook gathers the layer's input to the owner (:mod:`.eva_gather`); after the forward
   each owner folds its inputs into its incremental PCA (:mod:`.incremental_pca`) and checks
   convergence (cosine similarity of successive components >= tau); one all-reduce shares every
   group's convergence flags and explained-variance ratios; every rank then computes the same
   rank distribution (:mod:`.eva_ranks`). A group is done when its first rank_l components have
   converged (rank_l the largest rank among its layers); it is reopened if a later
   redistribution asks for more. Stop when all are done, or after ``max_batches`` batches
   (then warn, naming the unconverged layers, and use the current estimates).
   Memory: an owner keeps its groups' gathered inputs of one batch until that forward ends
   (so that all owners run their PCAs at the same time, not one after another inside the
   forward); the collectives per batch are, per open group, the gathers of :mod:`.eva_gather`,
   plus one all-reduce of Σ_g (1 + 2·k_g) fp64 values.
4. One all-reduce of a flat buffer (Σ_g rank_g · in_g fp32) carries each owner's components
   to every rank: replicated A's are bit-identical on all ranks.
Result: ``{global module name: A [rank, in_features]}`` (full, unsharded; rank 0 = no adapter).
Loading (:mod:`.eva_load`) slices A for this rank, zeroes B and writes rank/alpha patterns.

Layout invariance: TP/SP gathers rebuild exactly the single-process matrices, so any TP/SP
layout gives the single-process result. DP gathers the same rows in another order under
megatron's [s, b] layout: with ``svd="full"`` the result equals the single process's to
rounding; PEFT's randomised SVD (``svd="lowrank"``, the default) is rounding-sensitive on flat
spectra, which can move the batch at which a component passes the cosine test (tests/test_eva.py).
Not supported: computing under pipeline parallelism (refused with a clear error; a state dict
computed at PP=1 loads at any layout), context/expert parallelism.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..config import EvaConfig, LoraConfig
from ..model import LoraModel
from ..naming import global_module_name
from ..parallel.collectives import all_gather_object, all_reduce
from . import eva_gather as eg
from .eva_inputs import forward_fn_default, prepare_layer_inputs_fn_default, prepare_model_inputs_fn_default
from .eva_load import load_eva_state_dict
from .eva_ranks import redistribute_ranks
from .incremental_pca import SVD_MODES, IncrementalPCA, converged_components

RHO_CEILING = 1000  # PEFT: above this, rho is capped at max_dim // r
DEFAULT_MAX_BATCHES = 1000

# --- the run -------------------------------------------------------------------------------


@dataclass
class _Group:
    """One PCA: the layers whose inputs are equal (global names; the first carries the hook)."""

    names: list[str]
    in_features: int
    k: int
    layout: str
    owner: tuple[int, int] = (0, 0)
    pca: Optional[IncrementalPCA] = None
    pending: list[torch.Tensor] = field(default_factory=list)
    fitted: bool = False
    converged: Optional[torch.Tensor] = None  # [k] bool
    ratios: Optional[torch.Tensor] = None  # [k] fp64
    done: bool = False


@dataclass
class EvaRunInfo:
    """What the last :func:`get_eva_state_dict` on this rank did (for logs and benchmarks)."""

    batches: int = 0
    converged: bool = False
    unconverged: list[str] = field(default_factory=list)
    groups: int = 0
    groups_owned: int = 0  # at the end
    moves: int = 0  # PCA states moved between ranks by rebalancing
    pca_seconds: float = 0.0  # partial_fit time on this rank
    pca_work: dict[str, int] = field(default_factory=dict)  # per group (first layer): Σ rows·in_features of its updates here
    gather_seconds: float = 0.0  # time in the hooks (masking + gathers)
    total_seconds: float = 0.0


_last_run = EvaRunInfo()


def last_run_info() -> EvaRunInfo:
    return _last_run


def _log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        warnings.warn(message, stacklevel=3)


def _digest(x: torch.Tensor, layout: str) -> str:
    x = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{layout}|{tuple(x.shape)}|{x.dtype}".encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def _move(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _move(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_move(v, device) for v in inputs)
    return inputs


def _cycle(dataloader: Iterable) -> Iterable[tuple[int, Any]]:
    """(pass index, batch), repeating the dataloader forever; an empty one is an error."""
    for epoch in count():
        empty = True
        for batch in dataloader:
            empty = False
            yield epoch, batch
        if empty:
            raise ValueError("the EVA dataloader is empty.")


class _Run:
    def __init__(self, model, config: LoraConfig, adapter_name: str, topo: eg.Topology, prepare_model_inputs_fn,
                 prepare_layer_inputs_fn, svd: str) -> None:
        self.model, self.config, self.topo, self.svd = model, config, topo, svd
        self.eva = config.eva_config or EvaConfig()
        self.prepare_model_inputs_fn = prepare_model_inputs_fn
        self.prepare_layer_inputs_fn = prepare_layer_inputs_fn
        self.layers: dict[str, torch.nn.Module] = {}
        self.ranks: dict[str, int] = {}
        for name, layer in model.lora_layers():
            if adapter_name not in layer.lora_A:
                continue
            gname = global_module_name(model.model, name)
            self.layers[gname] = layer
            self.ranks[gname] = config.rank_for(gname)
        if not self.layers:
            raise ValueError(f"the model has no LoRA layer with adapter {adapter_name!r}.")
        if isinstance(prepare_layer_inputs_fn, Mapping):  # PEFT's keys carry "base_model.model."
            self.prepare_layer_inputs_fn = {k.removeprefix("base_model.model."): v for k, v in prepare_layer_inputs_fn.items()}
            unknown = set(self.prepare_layer_inputs_fn) - set(self.layers)
            if unknown:
                raise ValueError(f"prepare_layer_inputs_fn names modules that are not EVA targets: {sorted(unknown)}.")
        rho = self.eva.rho
        if rho > RHO_CEILING:
            max_dim = max(max(l.in_features, l.out_features) for l in self.layers.values())
            rho = min(rho, max_dim // config.r)
        self.max_components = {
            n: min(round(self.ranks[n] * rho), self.layers[n].in_features) for n in self.layers
        }
        self.budget = sum(self.ranks.values())
        self.device = next(iter(self.layers.values())).base_weight.device  # NCCL needs CUDA buffers
        self.model_input: Any = None
        self.info = EvaRunInfo()

    # hooks

    def _layer_rows(self, name: str, args: tuple) -> torch.Tensor:
        fn = self.prepare_layer_inputs_fn
        fn = fn.get(name, prepare_layer_inputs_fn_default) if isinstance(fn, Mapping) else fn
        fn = fn or prepare_layer_inputs_fn_default
        model_input = self.model_input
        layout = eg.layer_layout(self.layers[name])
        if layout == "sequence" and isinstance(model_input, torch.Tensor) and model_input.dtype == torch.bool:
            model_input = model_input.chunk(self.topo.tp_size, dim=0)[self.topo.tp_rank]  # this rank's slice
        x = fn(args, model_input, name)
        if x.ndim != 2:
            raise ValueError(f"prepare_layer_inputs_fn must return a 2-D [tokens, features] tensor, got {tuple(x.shape)} for {name}.")
        return x.detach().to(torch.float32)

    def _hash_hook(self, name: str, digests: dict):
        def hook(module, args):
            digests[name] = _digest(self._layer_rows(name, args), eg.layer_layout(self.layers[name]))

        return hook

    def _pca_hook(self, group: _Group):
        def hook(module, args):
            start = time.perf_counter()
            x = eg.gather_to_owner(self._layer_rows(group.names[0], args), group.layout, self.topo, group.owner)
            if x is not None:
                group.pending.append(x)
            self.info.gather_seconds += time.perf_counter() - start

        return hook

    def _forward(self, forward_fn, inputs, hooks: dict[str, Callable]) -> None:
        self.model_input = self.prepare_model_inputs_fn(inputs, self.config) if self.prepare_model_inputs_fn else inputs
        handles = [self.layers[n].register_forward_pre_hook(h) for n, h in hooks.items()]
        try:
            forward_fn(self.model, inputs)
        finally:
            for handle in handles:
                handle.remove()

    # steps

    def find_groups(self, forward_fn, first_batch) -> list[_Group]:
        """Step 1 and 2: layers with equal inputs on every rank share a PCA; owners assigned."""
        digests: dict[str, str] = {}
        self._forward(forward_fn, first_batch, {n: self._hash_hook(n, digests) for n in self.layers})
        missing = [n for n in self.layers if n not in digests]
        if missing:
            raise RuntimeError(f"the forward pass did not run the EVA target layers {missing}; check forward_fn.")
        names = list(self.layers)
        mine = [(n, self.layers[n].in_features, self.max_components[n], digests[n]) for n in names]
        everyone = all_gather_object(mine, self.topo.reduce_group)
        if any([m[:3] for m in theirs] != [m[:3] for m in mine] for theirs in everyone):
            raise RuntimeError("the ranks have different EVA target layers; every rank must hold the same model.")
        key = {n: tuple(theirs[i][3] for theirs in everyone) for i, n in enumerate(names)}
        by_key: dict[tuple, list[str]] = {}
        for n in names:
            by_key.setdefault(key[n], []).append(n)
        groups = []
        for members in by_key.values():
            k = max(self.max_components[n] for n in members)
            groups.append(_Group(members, self.layers[members[0]].in_features, k, eg.layer_layout(self.layers[members[0]])))
        for g, owner in zip(groups, self._balanced_owners(groups)):
            g.owner = owner
            g.pca = IncrementalPCA(g.k, self.svd) if self.topo.owns(owner) else None
        self.info.groups = len(groups)
        return groups

    def _balanced_owners(self, groups: list[_Group]) -> list[tuple[int, int]]:
        """Owners for ``groups``: longest processing time first (cost in_features·k per batch,
        the largest first, each to the least loaded TP×DP slot; ties to the lowest slot), the
        same on every rank."""
        load, owners = [0] * self.topo.slots, {}
        for i in sorted(range(len(groups)), key=lambda i: (-groups[i].in_features * groups[i].k, i)):
            slot = min(range(len(load)), key=lambda j: (load[j], j))
            load[slot] += groups[i].in_features * groups[i].k
            owners[i] = self.topo.slot(slot)
        return [owners[i] for i in range(len(groups))]

    def rebalance(self, groups: list[_Group]) -> None:
        """Re-divide the OPEN groups (not yet converged) among the ranks when that set has
        changed: how long a group stays open is unknown in advance (on the benchmark one
        rank's groups converged early and it idled while another did 4x its PCA work). A
        group whose owner changes moves its PCA state exactly: (n, mean, var, S·Vᵀ, S, ratios)
        = 3 + 2·in + k·(in + 2) fp64 values, all moved groups in one all-reduce."""
        open_groups = [g for g in groups if not g.done]
        if not open_groups or self.topo.slots == 1:
            return
        owners = self._balanced_owners(open_groups)
        moves = [(g, owner) for g, owner in zip(open_groups, owners) if owner != g.owner]
        if not moves:
            return
        sizes = [3 + 2 * g.in_features + g.k * (g.in_features + 2) for g, _ in moves]
        flat = torch.zeros(sum(sizes), dtype=torch.float64, device=self.device)
        offset = 0
        for (g, _), size in zip(moves, sizes):
            if g.pca is not None and g.pca.fitted:
                p, d, k = g.pca, g.in_features, g.k
                flat[offset : offset + size] = torch.cat([
                    torch.tensor([1.0, float(p.n_samples_seen), float(p.components.dtype == torch.float64)],
                                 dtype=torch.float64, device=self.device),
                    p.mean.double(), p.var.double(), p.components.double().reshape(-1),
                    p.singular_values.double(), p.explained_variance_ratio.double(),
                ])
            offset += size
        all_reduce(flat, self.topo.reduce_group)
        offset = 0
        for (g, owner), size in zip(moves, sizes):
            g.owner = owner
            g.pca = None
            if self.topo.owns(owner):
                g.pca = IncrementalPCA(g.k, self.svd)
                part, d, k = flat[offset : offset + size], g.in_features, g.k
                if part[0] > 0:  # fp32 values went through fp64 and back: exact
                    dtype = torch.float64 if part[2] > 0 else torch.float32
                    pieces = part[3:].split([d, d, k * d, k, k])
                    g.pca.n_samples_seen = int(part[1].item())
                    g.pca.mean, g.pca.var = pieces[0].clone(), pieces[1].clone()
                    g.pca.components = pieces[2].view(k, d).to(dtype)
                    g.pca.singular_values = pieces[3].to(dtype)
                    g.pca.explained_variance_ratio = pieces[4].clone()
            offset += size
        self.info.moves += len(moves)

    def fit_pending(self, groups: list[_Group]) -> None:
        """Owners fold the gathered inputs into their PCAs; one all-reduce shares the results."""
        start = time.perf_counter()
        for g in groups:
            for x in g.pending:
                if x.shape[0] < g.k:  # PEFT skips such a batch too
                    continue
                old = None if g.pca.components is None else g.pca.components.clone()
                g.pca.partial_fit(x)
                work = self.info.pca_work
                work[g.names[0]] = work.get(g.names[0], 0) + (x.shape[0] + g.k + 1) * g.in_features
                g.converged = converged_components(g.pca.components, old, self.eva.tau)
            g.pending.clear()
        self.info.pca_seconds += time.perf_counter() - start
        sizes = [1 + 2 * g.k for g in groups]
        stats = torch.zeros(sum(sizes), dtype=torch.float64, device=self.device)
        offset = 0
        for g, size in zip(groups, sizes):
            if g.pca is not None and g.pca.fitted:
                stats[offset] = 1
                stats[offset + 1 : offset + 1 + g.k] = g.converged.double()
                stats[offset + 1 + g.k : offset + size] = g.pca.explained_variance_ratio.double()
            offset += size
        all_reduce(stats, self.topo.reduce_group)
        offset = 0
        for g, size in zip(groups, sizes):
            g.fitted = bool(stats[offset] > 0)
            g.converged = stats[offset + 1 : offset + 1 + g.k] > 0.5
            g.ratios = stats[offset + 1 + g.k : offset + size].clone()
            offset += size

    def redistribute(self, groups: list[_Group]) -> dict[str, int]:
        representatives = [g.names[0] for g in groups]
        order = representatives + [n for g in groups for n in g.names[1:]]
        ratios = {n: g.ratios for g in groups for n in g.names}
        return redistribute_ranks(order, ratios, self.budget)

    def components(self, groups: list[_Group], rank_of: dict[str, int]) -> dict[str, torch.Tensor]:
        """Step 4: every layer's first rank_l components (whitened if asked), on every rank."""
        needed = [max(rank_of[n] for n in g.names) for g in groups]
        flat = torch.zeros(sum(k * g.in_features for k, g in zip(needed, groups)), dtype=torch.float32, device=self.device)
        offset = 0
        for g, k in zip(groups, needed):
            if g.pca is not None and k:
                u = g.pca.components[:k].double()
                if self.eva.whiten:
                    u = u / g.pca.singular_values[:k].double().sqrt()[:, None]
                flat[offset : offset + k * g.in_features] = u.reshape(-1).float()
            offset += k * g.in_features
        all_reduce(flat, self.topo.reduce_group)
        out, offset = {}, 0
        for g, k in zip(groups, needed):
            u = flat[offset : offset + k * g.in_features].view(k, g.in_features)
            for n in g.names:
                out[n] = u[: rank_of[n]].clone()
            offset += k * g.in_features
        return out


def _lora_model_config(model, peft_config: Optional[LoraConfig], adapter_name: str) -> LoraConfig:
    if not isinstance(model, LoraModel):
        raise TypeError(
            f"EVA needs a dist_lora LoraModel (from get_lora_model), got {type(model).__name__}."
        )
    if peft_config is None:
        if adapter_name not in model.peft_config:
            raise ValueError(f"the model has no adapter {adapter_name!r}; existing: {sorted(model.peft_config)}.")
        peft_config = model.peft_config[adapter_name]
    return peft_config


@torch.no_grad()
def get_eva_state_dict(
    model: torch.nn.Module,
    dataloader: Iterable,
    peft_config: Optional[LoraConfig] = None,
    forward_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = forward_fn_default,
    prepare_model_inputs_fn: Optional[Callable[[Any, LoraConfig], Any]] = prepare_model_inputs_fn_default,
    prepare_layer_inputs_fn: Union[Callable, Mapping[str, Callable], None] = prepare_layer_inputs_fn_default,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    max_batches: int = DEFAULT_MAX_BATCHES,
    svd: str = "lowrank",
) -> dict[str, torch.Tensor]:
    """EVA's A for every target layer: ``{global module name: [rank, in_features] fp32}``.

    Arguments as PEFT's ``get_eva_state_dict``. ``model`` is a LoraModel (its adapters are
    disabled during the forwards); ``peft_config`` defaults to its ``adapter_name`` config
    (r, rank_pattern, eva_config). ``forward_fn(model, batch)`` runs a forward;
    ``prepare_model_inputs_fn(batch, config)`` gives what ``prepare_layer_inputs_fn(layer_input,
    model_input, layer_name)`` needs to select a layer's tokens (a callable, or a dict from
    global module name to callable). Under sequence parallelism a bool-tensor ``model_input``
    (the token mask, [s, b]) is cut to this rank's sequence slice before the layer function
    sees it. ``gather_distributed_inputs=False``: every data-parallel rank reads the same data
    (the inputs are gathered over tensor parallelism only, where they are split).
    Beyond PEFT: ``max_batches`` caps the batches (PEFT loops until convergence; here a warning
    names the unconverged layers and their current estimates are used); ``svd`` "lowrank"
    (PEFT's randomised SVD, seeded) or "full" (exact) inside the incremental PCA.
    """
    global _last_run
    config = _lora_model_config(model, peft_config, adapter_name)
    if not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an integer >= 1, got {max_batches!r}.")
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {svd!r}.")
    if forward_fn is None:
        raise ValueError("forward_fn must be given (forward_fn_default runs HF and megatron-style batches).")
    from ..deepspeed.data_driven import check_forward_ready

    check_forward_ready(model, "EVA data pass (get_eva_state_dict)")
    started = time.perf_counter()
    topo = eg.current_topology(gather_distributed_inputs)
    run = _Run(model, config, adapter_name, topo, prepare_model_inputs_fn, prepare_layer_inputs_fn, svd)
    device = next(iter(run.layers.values())).base_weight.device
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            state = _run_loop(run, model, dataloader, forward_fn, device, show_progress_bar, max_batches)
    finally:
        model.train(training)
    run.info.total_seconds = time.perf_counter() - started
    _last_run = run.info
    return state


def _progress(show: bool, total: int):
    if not show or (dist.is_initialized() and dist.get_rank() != 0):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="EVA", leave=False)


def _run_loop(run: _Run, model, dataloader, forward_fn, device, show_progress_bar: bool, max_batches: int):
    batches = _cycle(dataloader)
    _, first = next(batches)
    groups = run.find_groups(forward_fn, _move(first, device))
    batches = _cycle(dataloader)  # as PEFT: the PCA starts again from the first batch
    rank_of = {n: run.max_components[n] for g in groups for n in g.names}
    bar = _progress(show_progress_bar, max_batches)
    open_before = frozenset(range(len(groups)))  # find_groups balanced them all
    try:
        for step in range(max_batches + 1):
            for g in groups:  # done: the components the current ranks use have converged
                need = max(rank_of[n] for n in g.names)
                g.done = g.converged is not None and bool(g.converged[:need].all())
            if bar is not None:
                bar.set_description(f"EVA: {sum(len(g.names) for g in groups if g.done)}/{len(run.layers)} layers converged")
            if all(g.done for g in groups) or step == max_batches:
                break
            open_now = frozenset(i for i, g in enumerate(groups) if not g.done)
            if open_now != open_before:
                run.rebalance(groups)
                open_before = open_now
            epoch, batch = next(batches)
            if epoch > 0 and not all(g.fitted for g in groups):
                _too_few_tokens(run, [g for g in groups if not g.fitted])
            run._forward(forward_fn, _move(batch, device), {g.names[0]: run._pca_hook(g) for g in groups if not g.done})
            run.fit_pending(groups)
            run.info.batches += 1
            if bar is not None:
                bar.update(1)
            if all(g.fitted for g in groups):
                rank_of = run.redistribute(groups)
    finally:
        if bar is not None:
            bar.close()
    if not all(g.fitted for g in groups):
        _too_few_tokens(run, [g for g in groups if not g.fitted])
    unconverged = [n for g in groups if not g.done for n in g.names]
    run.info.converged, run.info.unconverged = not unconverged, unconverged
    run.info.groups_owned = sum(g.pca is not None for g in groups)
    if unconverged:
        _log(
            f"EVA: {len(unconverged)} layer(s) did not converge (cosine similarity >= tau={run.eva.tau}) within "
            f"max_batches={max_batches}: {unconverged}; their current estimates are used. Raise max_batches, give "
            "more data or lower tau."
        )
    return run.components(groups, rank_of)


def _too_few_tokens(run: _Run, groups: list[_Group]) -> None:
    names = [n for g in groups for n in g.names]
    k = max(g.k for g in groups)
    raise ValueError(
        f"EVA: no batch had enough tokens for layers {names}: a PCA of {k} components (round(r·rho)) needs at "
        "least that many unmasked tokens in one batch (all data-parallel ranks together). Use larger batches, "
        "fewer masked tokens, or a smaller r or rho."
    )


@torch.no_grad()
def initialize_lora_eva_weights(
    model: torch.nn.Module,
    dataloader: Optional[Iterable] = None,
    eva_state_dict: Optional[dict[str, torch.Tensor]] = None,
    forward_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = forward_fn_default,
    prepare_model_inputs_fn: Optional[Callable[[Any, LoraConfig], Any]] = prepare_model_inputs_fn_default,
    prepare_layer_inputs_fn: Union[Callable, Mapping[str, Callable], None] = prepare_layer_inputs_fn_default,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
    max_batches: int = DEFAULT_MAX_BATCHES,
    svd: str = "lowrank",
) -> torch.nn.Module:
    """Initialise adapter ``adapter_name`` with EVA (PEFT's ``initialize_lora_eva_weights``):
    compute the EVA state dict from ``dataloader`` (see :func:`get_eva_state_dict`) unless
    ``eva_state_dict`` is given, then load it (:func:`dist_lora.init.eva_load.load_eva_state_dict`).
    Returns ``model``."""
    config = _lora_model_config(model, None, adapter_name)
    if len(model.active_adapters) > 1:
        raise ValueError(f"EVA initialises one active adapter at a time; active: {model.active_adapters}.")
    if config.init_lora_weights != "eva":
        raise ValueError(
            f"adapter {adapter_name!r} has init_lora_weights={config.init_lora_weights!r}; EVA needs a config with "
            "init_lora_weights='eva'."
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict; neither was given.")
        eva_state_dict = get_eva_state_dict(
            model, dataloader, forward_fn=forward_fn, prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs, show_progress_bar=show_progress_bar,
            max_batches=max_batches, svd=svd,
        )
    load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
