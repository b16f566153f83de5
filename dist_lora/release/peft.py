"""Map an adapter's tensors to a PEFT file: output names and adapter_config.json (a :class:`Plan`).

Tensors with HF module names (a plain HF model's checkpoint, a DeepSpeed checkpoint) are
written as they are under PEFT's ``base_model.model.`` prefix (:func:`identity_plan`); so are
megatron names with ``format="megatron"`` (dist_lora loads such a file into a megatron model at
any TP size). With ``format="peft"`` megatron names are mapped to the HF model's with the
bridge's family table (:func:`peft_plan`), ``decoder.layers.N.`` -> ``model.layers.N.``::

    self_attention.linear_qkv  A [r, h]             -> q_proj, k_proj, v_proj: A each (a copy)
                               B [(H+2G)·d, r], bias -> rows of each query group split into
                                                       q (H/G heads), k, v (split_qkv_rows)
    mlp.linear_fc1             A [r, h]             -> gate_proj, up_proj: A each
                               B [2F, r], bias      -> [gate; up] rows (split_gate_up)
    self_attention.linear_proj                      -> o_proj     (as is)
    mlp.linear_fc2                                  -> down_proj  (as is)
    embedding.word_embeddings  lora_embedding_A/B   -> model.embed_tokens (as is)

Mixture-of-experts adapters (every expert's ``linear_fc1`` / ``linear_fc2``, the router) become
PEFT ``target_parameters`` on transformers 5's fused ``mlp.experts.gate_up_proj`` /
``down_proj`` and ``mlp.gate.weight``, stacked per layer projection (:mod:`.experts`; needs
``hf_model_dir``); the config then lists them in ``target_parameters`` (full names, ranks and
alphas in the patterns) and the other modules in ``target_modules`` as below.

A fused adapter with A shared by q/k/v is exactly three adapters with equal A's, each of rank
r and the fused module's alpha, so the scaling is unchanged. modules_to_save tensors are
split by rows the same way. The config's ``target_modules`` becomes the sorted list of full HF
module names that have adapters (PEFT matches list entries exactly); ``rank_pattern`` /
``alpha_pattern`` (regexes over megatron names, which do not translate in general) become
explicit full-HF-name entries wherever a module's effective rank / alpha differs from ``r`` /
``lora_alpha``; ``layers_to_transform`` / ``layers_pattern`` / ``exclude_modules`` /
``megatron_config`` become None; ``init_lora_weights`` True; ``inference_mode`` True;
``base_model_name_or_path`` the ``hf_model_dir`` when given.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from ..bridges import (
    DEFAULT_MODULES,
    HFLlamaArch,
    hf_module_names,
    is_megatron_name,
    parse_hf_config,
    read_hf_config,
    rows_to_hf,
)
from ..checkpoint.peft_format import PREFIX
from ..checkpoint.safetensors_stream import row_runs
from ..config import LoraConfig, explicit_pattern
from .checks import check_geometry, check_ranks
from .errors import ConsolidationError
from .experts import is_moe_module, split_moe_sources, target_parameter_plan
from .hf_model import hf_modules
from .sources import A_SUFFIXES, LORA_SUFFIXES, Source
from .write import Group, Output, Plan

FORMATS = ("peft", "megatron")


def peft_plan(sources: dict[str, Source], config: LoraConfig, hf_model_dir: Optional[str], format: str) -> Plan:
    """The plan for ``format`` (see the module docstring). ``hf_model_dir`` (an HF model
    directory with ``config.json``) is checked against megatron-named adapters and gives the
    attention geometry needed to split a fused QKV adapter (required for ``format="peft"`` when
    there is one)."""
    check_format(format)
    megatron_names = uses_megatron_names(sources, format)
    arch = None
    if hf_model_dir is not None and megatron_names:
        arch = hf_arch(hf_model_dir)
        check_geometry(sources, arch, config, hf_model_dir)
    if format == "megatron" or not megatron_names:
        return identity_plan(sources, config, hf_model_dir, rename=format == "peft")
    moe, sources = split_moe_sources(sources)
    if moe and (arch is None or not getattr(arch, "num_experts", 0)):
        raise ConsolidationError(
            "the checkpoint has LoRA on mixture-of-experts experts or routers; releasing them as PEFT "
            "target_parameters needs the transformers 5 MoE model they were trained on: pass its directory "
            "(--hf-model / hf_model_dir), or use --format megatron."
        )
    if arch is None and any(_fused_layout(src.module) == "qkv" for src in sources.values()):
        raise ConsolidationError(
            "the checkpoint has fused linear_qkv adapters; splitting them into q_proj/k_proj/v_proj needs "
            "the model's attention heads, key-value heads and head_dim: pass the HF model directory "
            "(--hf-model / hf_model_dir) or use --format megatron."
        )
    groups = megatron_to_hf(sources, arch)
    released = _hf_config(config, sources, hf_model_dir)
    if moe:
        groups, released = _with_target_parameters(moe, config, arch, hf_model_dir, groups, released)
    plan = Plan(groups, released)
    names = plan.output_names()
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise ConsolidationError(f"several checkpoint tensors map to the same output tensor: {duplicated[:5]}.")
    return plan


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConsolidationError(f"format must be one of {FORMATS}, got {format!r}.")


def identity_plan(sources: dict[str, Source], config: LoraConfig, hf_model_dir: Optional[str], rename: bool) -> Plan:
    """Each source written under its own name with PEFT's ``base_model.model.`` prefix, ranks
    checked against ``config``; ``rename``: ``base_model_name_or_path`` becomes ``hf_model_dir``."""
    check_ranks(config, sources)
    groups = [(src, [Output(PREFIX + src.key, src.global_shape, None)]) for src in sources.values()]
    return Plan(groups, released_config(config, hf_model_dir if rename else None))


def uses_megatron_names(sources: dict[str, Source], format: str) -> bool:
    """Whether the sources have megatron module names; for ``format="peft"`` every one of them
    must then map to an HF module."""
    if not any(is_megatron_name(s.module) for s in sources.values()):
        return False
    unmapped = [module for module in sorted({s.module for s in sources.values()})
                if _fused_layout(module) is None and not is_moe_module(module)]
    if unmapped and format == "peft":
        raise ConsolidationError(
            f"modules {unmapped[:3]}{' ...' if len(unmapped) > 3 else ''} have no Hugging Face counterpart in the "
            f"Llama-family bridge ({DEFAULT_MODULES.known_megatron()}); use --format megatron to keep the "
            "megatron names."
        )
    return True


def _fused_layout(module: str) -> Optional[str]:
    """The fused layout of a megatron module in the bridge's table, None if it maps no HF module."""
    try:
        return DEFAULT_MODULES.megatron(module).entry.fused
    except KeyError:
        return None


def hf_arch(hf_model_dir: str) -> HFLlamaArch:
    """The checked architecture facts of the HF model's ``config.json``."""
    try:
        return parse_hf_config(read_hf_config(hf_model_dir))
    except FileNotFoundError as e:
        raise ConsolidationError(f"--hf-model: {e}") from None
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConsolidationError(f"--hf-model: {hf_model_dir}/config.json is not a usable config ({e!r}).") from None


def megatron_to_hf(sources: dict[str, Source], arch: Optional[HFLlamaArch]) -> list[Group]:
    """Each source's outputs under HF names: as is, A copied per fused part, or the fused
    rows split with the bridge's own layout functions (applied to row indices)."""
    attention = arch.attention if arch is not None else None
    groups = []
    for source in sources.values():
        rows = source.global_shape[0] if source.global_shape else 0
        outputs = [
            Output(f"{PREFIX}{hf}.{source.suffix}", source.global_shape, None)
            if part is None
            else Output(f"{PREFIX}{hf}.{source.suffix}", (len(part), *source.global_shape[1:]), row_runs(part))
            for hf, part in rows_to_hf(source.module, rows, attention, shared=source.suffix in A_SUFFIXES)
        ]
        groups.append((source, outputs))
    return groups


# ---------------------------------------------------------------------------------------------
# adapter_config.json


def released_config(config: LoraConfig, hf_model_dir: Optional[str], **changes: Any) -> LoraConfig:
    """``config`` as a released file's: ``init_lora_weights`` True (the weights are in the
    file), ``inference_mode`` True, ``megatron_config`` None, ``base_model_name_or_path``
    ``hf_model_dir`` when given; then ``changes``."""
    data = config.to_dict()
    data.update(init_lora_weights=True, inference_mode=True, megatron_config=None)
    if hf_model_dir is not None:
        data["base_model_name_or_path"] = hf_model_dir
    data.update(changes)
    return LoraConfig.from_dict(data)


def explicit_targets(
    config: LoraConfig, ranks: dict[str, int], alphas: dict[str, float], order: Optional[Callable[[str], Any]] = None
) -> dict[str, Any]:
    """The config fields for adapters on exactly the modules of ``ranks`` (full names, sorted
    by ``order``): PEFT matches ``target_modules`` list entries exactly; ``rank_pattern`` /
    ``alpha_pattern`` give each module whose rank / alpha differs from ``r`` / ``lora_alpha``
    its value; no layer or exclude filters."""
    return dict(
        target_modules=sorted(ranks, key=order),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern=explicit_pattern(ranks, config.r),
        alpha_pattern=explicit_pattern(alphas, config.lora_alpha),
    )


def _with_target_parameters(
    moe: dict[str, Source], config: LoraConfig, arch: HFLlamaArch, hf_model_dir: Optional[str], groups: list[Group],
    released: LoraConfig,
) -> tuple[list[Group], LoraConfig]:
    """Expert and router adapters added to a release as PEFT target_parameters (:mod:`.experts`):
    their groups, and the config's ``target_parameters`` with their ranks / alphas in
    ``rank_pattern`` / ``alpha_pattern`` (full HF parameter names)."""
    check_ranks(config, moe)
    order = {name: list(described[1]) for name, described in hf_modules(hf_model_dir, config.layer_replication).items()}
    extra = target_parameter_plan(moe, config, arch.family, arch.num_experts, order)
    ranks = {**released.rank_pattern, **explicit_pattern(extra.ranks, config.r)}
    alphas = {**released.alpha_pattern, **explicit_pattern(extra.alphas, config.lora_alpha)}
    data = released.to_dict()
    data.update(target_parameters=sorted(extra.ranks), rank_pattern=ranks, alpha_pattern=alphas,
                target_modules=data["target_modules"] or [])
    return groups + extra.groups, LoraConfig.from_dict(data)


def _hf_config(config: LoraConfig, sources: dict[str, Source], hf_model_dir: Optional[str]) -> LoraConfig:
    """The released config of megatron-named sources mapped to HF modules."""
    rank_of, alpha_of, saved = {}, {}, set()
    for module, rank in check_ranks(config, sources).items():
        for hf in hf_module_names(module):
            rank_of[hf], alpha_of[hf] = rank, config.alpha_for(module)
    for source in sources.values():
        if source.suffix not in LORA_SUFFIXES:
            saved.update(hf_module_names(source.module))
    targets = explicit_targets(config, rank_of, alpha_of)
    return released_config(config, hf_model_dir, modules_to_save=sorted(saved) or None, **targets)
