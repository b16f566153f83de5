"""Megatron expert and router adapters -> PEFT ``target_parameters`` of a transformers 5 MoE model.

transformers 5 (Qwen3-MoE, Mixtral) keeps a layer's experts in two fused 3-D parameters,
``model.layers.N.mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], and its
router weight as the parameter ``model.layers.N.mlp.gate.weight`` [E, H] of a non-Linear
module; PEFT 0.21 adapts them through ``LoraConfig.target_parameters`` only. A megatron
checkpoint holds one adapter per expert (global index e, :mod:`dist_lora.naming`)::

    decoder.layers.N.mlp.experts.local_experts.e.linear_fc1  A_e [r, H], B_e [2I, r] ([gate; up] rows)
    decoder.layers.N.mlp.experts.local_experts.e.linear_fc2  A_e [r, I], B_e [H, r]
    decoder.layers.N.mlp.router                              A [r, H],   B [E, r]

and the release stacks them (:func:`dist_lora.expert_layout.stack_experts`, the one home of
PEFT's order: lora_A expert-major, lora_B rank-major) into one :class:`Stacked` source per
(layer, projection), small and built in memory from its E checkpoint tensors; fc1's B rows
[gate; up] are already ``gate_up_proj[e]``'s row order (``is_concatenated`` experts). The
router's factors are written as they are (a 2-D parameter is PEFT's E = 1 case). Keys follow
PEFT's nesting of two targeted parameters of one module
(:func:`dist_lora.expert_layout.peft_parameter_key`). The names on both sides come from the
bridge's family table (an expert-indexed entry's ``v5`` parameter, the router entry's module).

An adapter shared by all experts of a layer (``expert_adapters="shared"``) is saved per expert
with equal values, so it is released copied per expert (exact: PEFT has no shared form).

Refused (a :class:`~.errors.ConsolidationError`, before anything is written): experts missing
from the checkpoint, per-expert ranks or alphas that differ within one layer's projection
(PEFT stacks them at one rank), a bias on the expert/router B or DoRA (PEFT's ``ParamWrapper``
has neither), no HF model directory (its config gives E and the parameter order).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..bridges import ModelFamily, Module
from ..checkpoint.peft_format import PREFIX
from ..config import LoraConfig
from ..expert_layout import parameter_geometry, peft_parameter_key, stack_a, stack_b
from ..layers.base import LoraLayer
from ..naming import is_expert_name, shared_expert_name
from .errors import ConsolidationError
from .sources import Source
from .write import Output, Stacked

A_KEY, B_KEY = LoraLayer.factor_keys  # "lora_A.weight", "lora_B.weight"
ROUTER = "mlp.router"  # megatron's router module in a decoder layer


def is_moe_module(module: str) -> bool:
    """A megatron expert projection or router module (released as a target parameter)."""
    return is_expert_name(module) or module.endswith("." + ROUTER)


def parameter_entries(family: ModelFamily) -> dict[str, Module]:
    """The layer-relative transformers 5 parameter names PEFT's target_parameters adapt -> their
    family-table entries: the fused expert parameters (an expert-indexed entry's ``v5``, e.g.
    ``mlp.experts.gate_up_proj``) and the router weight (``<router module>.weight``)."""
    out = {}
    for entry in family.modules.layer:
        if entry.per_expert and entry.v5:
            out[entry.v5] = entry
        elif entry.megatron == ROUTER:
            out[f"{entry.v5 or entry.hf[0]}.weight"] = entry
    return out


def target_parameter(family: ModelFamily, module: str) -> tuple[str, Optional[int]]:
    """(full HF parameter name, global expert index or None for the router) of a megatron
    expert projection or router module (global names)."""
    mapped = family.modules.megatron(module)
    if mapped.expert is not None:
        return mapped.v5, mapped.expert
    return f"{mapped.v5 or mapped.hf[0]}.weight", None


@dataclasses.dataclass
class TargetParameters:
    """The target-parameter part of a release: its groups (one output each), and the released
    parameters' ranks / alphas by full HF parameter name."""

    groups: list
    ranks: dict[str, int]
    alphas: dict[str, float]


def split_moe_sources(sources: dict[str, Source]) -> tuple[dict[str, Source], dict[str, Source]]:
    """(expert and router sources, the others)."""
    moe = {k: s for k, s in sources.items() if is_moe_module(s.module)}
    return moe, {k: s for k, s in sources.items() if k not in moe}


def target_parameter_plan(
    sources: dict[str, Source], config: LoraConfig, family: ModelFamily, num_experts: int,
    parameter_order: dict[str, list[str]],
) -> TargetParameters:
    """The groups and ranks of the expert and router ``sources`` (megatron names of ``family``).
    ``num_experts``: E of the HF model; ``parameter_order``: each HF module's parameter names in
    registration order (from the HF model; PEFT nests two targeted parameters of a module in it)."""
    for source in sources.values():
        if source.suffix not in (A_KEY, B_KEY):
            raise ConsolidationError(
                f"{source.key}: PEFT adapts fused expert and router parameters (target_parameters) with lora_A and "
                "lora_B only; a bias on lora_B or DoRA cannot be released for them."
            )
    by_parameter: dict[str, dict[Optional[int], dict[str, Source]]] = {}
    for source in sources.values():
        parameter, expert = target_parameter(family, source.module)
        by_parameter.setdefault(parameter, {}).setdefault(expert, {})[source.suffix] = source
    groups, ranks, alphas = [], {}, {}
    for parameter, by_expert in sorted(by_parameter.items()):
        module, short = parameter.rsplit(".", 1)
        if None in by_expert:  # the router: a 2-D parameter, its factors as they are
            factors = by_expert[None]
            if set(factors) != {A_KEY, B_KEY}:
                module = factors[min(factors)].module
                raise ConsolidationError(f"{module} has {sorted(factors)} but needs lora_A and lora_B.")
            for suffix, source in sorted(factors.items()):
                groups.append((source, [Output(f"{PREFIX}{module}.{suffix}", source.global_shape, None, parameter)]))
            ranks[parameter], alphas[parameter] = factors[A_KEY].global_shape[0], config.alpha_for(factors[A_KEY].module)
            continue
        _check_complete(by_expert, num_experts, parameter)
        rank, alpha = _uniform(config, by_expert, parameter)
        targeted = [p for p in parameter_order.get(module, [short]) if f"{module}.{p}" in by_parameter]
        key = PREFIX + peft_parameter_key(module, short, targeted)
        a_parts = [by_expert[e][A_KEY] for e in range(num_experts)]
        b_parts = [by_expert[e][B_KEY] for e in range(num_experts)]
        stacked_a = Stacked(f"{key}.{A_KEY}", (rank * num_experts, a_parts[0].global_shape[1]), a_parts[0].dtype, a_parts,
                            stack_a)
        stacked_b = Stacked(f"{key}.{B_KEY}", (b_parts[0].global_shape[0], rank * num_experts), b_parts[0].dtype, b_parts,
                            stack_b)
        for stacked in (stacked_a, stacked_b):
            groups.append((stacked, [Output(stacked.key, stacked.global_shape, None, parameter)]))
        ranks[parameter], alphas[parameter] = rank, alpha
    return TargetParameters(groups, ranks, alphas)


def _check_complete(by_expert: dict, num_experts: int, parameter: str) -> None:
    missing = [e for e in range(num_experts) if set(by_expert.get(e, {})) != {A_KEY, B_KEY}]
    extra = sorted(e for e in by_expert if e >= num_experts)
    if missing or extra:
        raise ConsolidationError(
            f"{parameter}: the checkpoint's expert adapters do not cover the HF model's "
            f"{num_experts} experts (missing or incomplete: {missing[:8]}, beyond the model: {extra[:8]}). PEFT's "
            "target_parameters adapt every expert of a fused parameter: train with the expert count of the model."
        )


def _uniform(config: LoraConfig, by_expert: dict, parameter: str) -> tuple[int, float]:
    """The one rank and alpha of a layer projection's experts; refused when they differ."""
    ranks = {by_expert[e][A_KEY].global_shape[0] for e in by_expert}
    alphas = {config.alpha_for(by_expert[e][A_KEY].module) for e in by_expert}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ConsolidationError(
            f"{parameter}: the experts have ranks {sorted(ranks)} and alphas "
            f"{sorted(alphas)}; PEFT stacks a fused expert parameter's adapters at one rank and one alpha. Give all "
            "experts of a layer the same rank_pattern / alpha_pattern entry."
        )
    expert_free = shared_expert_name(by_expert[min(by_expert)][A_KEY].module)
    shared = {config.alpha_for(expert_free)}
    if shared != alphas:  # a shared-adapter run used the expert-free name's alpha; the checkpoint does not say which
        raise ConsolidationError(
            f"{parameter}: alpha_pattern gives the experts' expert-free name {expert_free} "
            f"alpha {sorted(shared)} but the per-expert names {sorted(alphas)}; a run with shared expert adapters "
            "(runtime_config.expert_adapters='shared') scales with the former, a per-expert run with the latter, and the "
            "checkpoint does not record which. Release it with an alpha_pattern that gives both the same alpha."
        )
    return ranks.pop(), alphas.pop()


def expected_parameter_shape(suffix: str, rank_rows: int, params: dict[str, tuple], parameter: str,
                             transposed: bool) -> Optional[tuple[int, ...]]:
    """The shape PEFT needs for the factor ``suffix`` of the adapter on ``parameter`` (a full
    name; its module's parameter shapes ``params``) holding ``rank_rows`` = r·E stacked ranks;
    None if the module has no such parameter; a ConsolidationError if r·E is no multiple of E."""
    short = parameter.rsplit(".", 1)[1]
    if short not in params:
        return None
    experts, n_in, n_out = parameter_geometry(params[short], transposed)
    if rank_rows % experts:
        raise ConsolidationError(
            f"the adapter of {parameter} has {rank_rows} stacked ranks, not a multiple of its {experts} experts."
        )
    return (rank_rows, n_in) if suffix == A_KEY else (n_out, rank_rows)
