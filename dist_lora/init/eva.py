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
   again and a moved group's PCA state travels with it, exactly (``EvaRun.rebalance`` in :mod:`.eva_run`).
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

import time
import warnings
from itertools import count
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist

from ..config import LoraConfig
from ..model import LoraModel
from ..parallel.zero_forward import check_forward_ready
from . import eva_gather as eg
from .eva_inputs import forward_fn_default, prepare_layer_inputs_fn_default, prepare_model_inputs_fn_default
from .eva_load import load_eva_state_dict
from .eva_run import EvaRun, EvaRunInfo, PcaGroup
from .incremental_pca import SVD_MODES

DEFAULT_MAX_BATCHES = 1000

_last_run = EvaRunInfo()


def last_run_info() -> EvaRunInfo:
    return _last_run


def _log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        warnings.warn(message, stacklevel=3)


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
    check_forward_ready(model, "EVA data pass (get_eva_state_dict)")
    started = time.perf_counter()
    topo = eg.current_topology(gather_distributed_inputs)
    run = EvaRun(model, config, adapter_name, topo, prepare_model_inputs_fn, prepare_layer_inputs_fn, svd)
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


def _run_loop(run: EvaRun, model, dataloader, forward_fn, device, show_progress_bar: bool, max_batches: int):
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
            run.forward(forward_fn, _move(batch, device), {g.names[0]: run.pca_hook(g) for g in groups if not g.done})
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


def _too_few_tokens(run: EvaRun, groups: list[PcaGroup]) -> None:
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
