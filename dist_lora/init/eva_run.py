"""The EVA computation itself: PCA groups of layers with equal inputs, their owners among
the TP x DP ranks, the hooks that gather each layer's inputs to its owner, incremental PCA,
rank redistribution and the final broadcast of the components. The steps, the collectives
and the layout invariance are described in :mod:`dist_lora.init.eva`, whose
:func:`~dist_lora.init.eva.get_eva_state_dict` drives an :class:`EvaRun` batch by batch.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from ..config import EvaConfig, LoraConfig
from ..naming import global_module_name
from ..parallel.collectives import all_gather_object, all_reduce
from . import eva_gather as eg
from .eva_inputs import prepare_layer_inputs_fn_default
from .eva_ranks import redistribute_ranks
from .incremental_pca import IncrementalPCA, converged_components

RHO_CEILING = 1000  # PEFT: above this, rho is capped at max_dim // r


@dataclass
class PcaGroup:
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


def _digest(x: torch.Tensor, layout: str) -> str:
    x = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{layout}|{tuple(x.shape)}|{x.dtype}".encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


class EvaRun:
    """One EVA computation over a LoraModel's adapter: the PCA groups, their owners, the hooks
    and the collectives (steps 1 to 4 of :mod:`dist_lora.init.eva`)."""


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

    def pca_hook(self, group: PcaGroup):
        def hook(module, args):
            start = time.perf_counter()
            x = eg.gather_to_owner(self._layer_rows(group.names[0], args), group.layout, self.topo, group.owner)
            if x is not None:
                group.pending.append(x)
            self.info.gather_seconds += time.perf_counter() - start

        return hook

    def forward(self, forward_fn, inputs, hooks: dict[str, Callable]) -> None:
        self.model_input = self.prepare_model_inputs_fn(inputs, self.config) if self.prepare_model_inputs_fn else inputs
        handles = [self.layers[n].register_forward_pre_hook(h) for n, h in hooks.items()]
        try:
            forward_fn(self.model, inputs)
        finally:
            for handle in handles:
                handle.remove()

    # steps

    def find_groups(self, forward_fn, first_batch) -> list[PcaGroup]:
        """Step 1 and 2: layers with equal inputs on every rank share a PCA; owners assigned."""
        digests: dict[str, str] = {}
        self.forward(forward_fn, first_batch, {n: self._hash_hook(n, digests) for n in self.layers})
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
            groups.append(PcaGroup(members, self.layers[members[0]].in_features, k, eg.layer_layout(self.layers[members[0]])))
        for g, owner in zip(groups, self._balanced_owners(groups)):
            g.owner = owner
            g.pca = IncrementalPCA(g.k, self.svd) if self.topo.owns(owner) else None
        self.info.groups = len(groups)
        return groups

    def _balanced_owners(self, groups: list[PcaGroup]) -> list[tuple[int, int]]:
        """Owners for ``groups``: longest processing time first (cost in_features·k per batch,
        the largest first, each to the least loaded TP×DP slot; ties to the lowest slot), the
        same on every rank."""
        load, owners = [0] * self.topo.slots, {}
        for i in sorted(range(len(groups)), key=lambda i: (-groups[i].in_features * groups[i].k, i)):
            slot = min(range(len(load)), key=lambda j: (load[j], j))
            load[slot] += groups[i].in_features * groups[i].k
            owners[i] = self.topo.slot(slot)
        return [owners[i] for i in range(len(groups))]

    def rebalance(self, groups: list[PcaGroup]) -> None:
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

    def fit_pending(self, groups: list[PcaGroup]) -> None:
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

    def redistribute(self, groups: list[PcaGroup]) -> dict[str, int]:
        representatives = [g.names[0] for g in groups]
        order = representatives + [n for g in groups for n in g.names[1:]]
        ratios = {n: g.ratios for g in groups for n in g.names}
        return redistribute_ranks(order, ratios, self.budget)

    def components(self, groups: list[PcaGroup], rank_of: dict[str, int]) -> dict[str, torch.Tensor]:
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
