"""Releases that serving engines (vLLM, SGLang) load with the trained numbers: the one home of
the engines' rules (``dist-lora consolidate --for ENGINE``, ``dist-lora inspect --for ENGINE``).

The engines read a PEFT adapter with rules of their own (one table per engine, :data:`ENGINES`):

* one global scaling ``lora_alpha / r`` (vLLM: ``alpha / sqrt(r)`` with ``use_rslora``): SGLang
  and vLLM up to 0.31 ignore ``rank_pattern`` / ``alpha_pattern`` (their ``PEFTHelper`` has no
  such fields); vLLM 0.32+ resolves them per module as PEFT does (tests/test_serving_vllm.py
  checks both against vLLM's own code), so the fold is what makes one release right for all. Each
  module's rank is read from its tensors' shapes (vLLM copies ``lora_a[:rank]`` into its
  ``max_lora_rank``-wide slots), so vLLM does NOT need uniform ranks; we still pad every module
  with zeros to the largest rank (exact) so that the release, having no ``rank_pattern``, also
  loads in PEFT with the same numbers;
* ``r`` and every module's rank at most the server's ``max_lora_rank``, one of
  :data:`MAX_LORA_RANKS` (vLLM's choices; we assume the same bound for SGLang);
* refused: DoRA, ``modules_to_save``, ``bias != "none"`` and ``lora_bias``, layer replication
  (the adapter names layers the served model does not have), unconverted PiSSA / OLoRA / CorDA
  and LoftQ (only right on the base their init rewrote), LoRA on fused expert / router
  parameters (PEFT ``target_parameters``: the engines' MoE LoRA rules are their own and not
  reproduced here); SGLang also refuses MoE expert adapters (it expects its own layout).

:func:`fold_scaling` makes the global scaling exact: ``B' = B · s_module / s_global`` with
``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) per module and ``s_global = lora_alpha /
R`` of the written config (``r = R``, the largest rank), which has no patterns and
``use_rslora`` False (so both engines compute the same ``s_global``). The product is taken in
fp64 and rounded once to B's dtype.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import torch

from ..checkpoint.peft_format import PREFIX, WEIGHTS_NAME, read_adapter_file, write_adapter_dir
from ..config import LoraConfig
from ..layers.math import lora_scaling
from .errors import ConsolidationError
from .sources import A_SUFFIXES, split_key

B_SUFFIXES = ("lora_B.weight", "lora_embedding_B")  # B [out, r]: scaled and padded by columns
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MERGE_ADVICE = "release a merged model instead (dist-lora merge CHECKPOINT OUT_DIR --hf-model HF_DIR)"


@dataclasses.dataclass(frozen=True)
class Engine:
    """One serving engine's rules for PEFT adapters."""

    name: str
    one_scaling: str  # which versions apply one lora_alpha / r to every module (ignore the patterns)
    max_lora_ranks: tuple[int, ...] = MAX_LORA_RANKS
    refuses_moe: bool = False


ENGINES = {
    "vllm": Engine("vLLM", one_scaling="vLLM up to 0.31 (0.32+ reads the patterns)"),
    "sglang": Engine("SGLang", one_scaling="SGLang", refuses_moe=True),
}
TARGETS = ("peft", *ENGINES)


def engine_for(target: str) -> Optional[Engine]:
    """The engine of a release target (None for ``"peft"``); an unknown target is refused."""
    if target not in TARGETS:
        raise ConsolidationError(f"--for (target) must be one of {TARGETS}, got {target!r}.")
    return ENGINES.get(target)


# ---------------------------------------------------------------------------------------------
# What an engine cannot serve


def _feature_rules(engine: Engine) -> list[tuple[Callable[[LoraConfig, list[str]], bool], str]]:
    """(refused when, the engine's rule and what to do instead)."""
    e = engine.name
    return [
        (lambda c, m: c.use_dora, f"{e} does not serve DoRA adapters (use_dora=True); {MERGE_ADVICE}."),
        (lambda c, m: bool(c.modules_to_save), f"{e} serves only modules_to_save=None; {MERGE_ADVICE}."),
        (lambda c, m: c.bias != "none" or c.lora_bias,
         f"{e} serves only bias='none' without lora_bias (this adapter trains biases); {MERGE_ADVICE}."),
        (lambda c, m: bool(c.layer_replication),
         f"{e} applies the adapter to the original model's layers, but layer_replication names layers that model "
         f"does not have; {MERGE_ADVICE}."),
        (lambda c, m: c.init_kind.convertible,
         f"{e} serves the adapter on the original base, but a PiSSA / OLoRA / CorDA adapter (unconverted) is only "
         "right on the base its init rewrote; release it converted to a plain LoRA of rank 2r (dist-lora "
         "consolidate --initial INITIAL_CHECKPOINT, or PEFT's save_pretrained(..., "
         "path_initial_model_for_weight_conversion=...))."),
        (lambda c, m: c.init_kind.method == "loftq" or bool(c.loftq_config),
         f"{e} serves the adapter on the original base, but a LoftQ adapter is only right on its LoftQ-quantised "
         "base; serve it with PEFT on that base."),
        (lambda c, m: bool(c.target_parameters),
         f"{e} applies LoRA to mixture-of-experts layers with rules of its own (expert layout, fused-MoE kernels) that "
         "dist-lora does not reproduce, and this adapter adapts fused expert / router parameters "
         f"(PEFT target_parameters); {MERGE_ADVICE}, or serve the PEFT release (--for peft) with PEFT."),
        (lambda c, m: engine.refuses_moe and any(".experts." in name for name in m),
         f"{e} expects MoE expert adapters in its own layout; {MERGE_ADVICE}."),
    ]


def unservable(config: LoraConfig, engine: Engine, modules: list[str] = ()) -> list[str]:
    """Why ``engine`` cannot serve an adapter of ``config`` on ``modules`` at all (empty: it can)."""
    return [message for refused, message in _feature_rules(engine) if refused(config, list(modules))]


def check_servable(config: LoraConfig, engine: Engine, modules: list[str] = (), where: str = "the adapter") -> None:
    """Raise a ConsolidationError naming the engine's rule and the advice if it cannot serve it."""
    problems = unservable(config, engine, modules)
    if problems:
        raise ConsolidationError(f"{where} cannot be released for {engine.name}: " + " ".join(problems))


def max_lora_rank(config: LoraConfig, ranks: dict[str, int], engine: Engine) -> int:
    """The smallest ``max_lora_rank`` the server needs: the least choice >= r and every rank."""
    need = max([config.r, *ranks.values()])
    for choice in engine.max_lora_ranks:
        if need <= choice:
            return choice
    raise ConsolidationError(
        f"rank {need} is above {engine.name}'s largest max_lora_rank {engine.max_lora_ranks[-1]}; retrain with a "
        f"smaller r, or {MERGE_ADVICE}."
    )


# ---------------------------------------------------------------------------------------------
# Folding the per-module scaling into B


def module_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each adapted module's rank (full name, no PEFT prefix), read from its A's shape."""
    ranks = {}
    for key, tensor in tensors.items():
        module, suffix = split_key(key.removeprefix(PREFIX))
        if suffix in A_SUFFIXES:
            ranks[module] = int(tensor.shape[0])
    return ranks


def module_scalings(config: LoraConfig, ranks: dict[str, int]) -> dict[str, float]:
    """Each module's trained scaling: its alpha (``alpha_pattern``) over its rank (tensors)."""
    return {m: lora_scaling(config.alpha_for(m), r, config.use_rslora) for m, r in ranks.items()}


def global_scaling(config: LoraConfig) -> float:
    """The one scaling an engine applies to every module: ``lora_alpha`` over ``r``."""
    return lora_scaling(config.lora_alpha, config.r, config.use_rslora)


def engine_config(config: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """The config of the folded release of modules with ``ranks``: ``r`` the largest rank, no
    patterns, no rsLoRA (see :func:`fold_scaling`)."""
    changes = {"r": max(ranks.values()), "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    return LoraConfig.from_dict({**config.to_dict(), **changes})


def fold_scaling(tensors: dict[str, torch.Tensor], config: LoraConfig) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The tensors with ``B' = B · s_module / s_global`` (fp32), every module padded with zeros to
    the largest rank ``R`` (exact), and the config with ``r = R``, no patterns, no rsLoRA, whose
    one scaling ``lora_alpha / R`` gives every module its trained scaling."""
    ranks = module_ranks(tensors)
    scalings, rank = module_scalings(config, ranks), max(ranks.values())
    flat = engine_config(config, ranks)
    target = global_scaling(flat)
    out = {}
    for key, tensor in tensors.items():
        module, suffix = split_key(key.removeprefix(PREFIX))
        if suffix in A_SUFFIXES:
            tensor = torch.nn.functional.pad(tensor, (0, 0, 0, rank - tensor.shape[0]))
        elif suffix in B_SUFFIXES:
            ratio = scalings[module] / target
            tensor = torch.nn.functional.pad((tensor.double() * ratio).to(tensor.dtype), (0, rank - tensor.shape[1]))
        out[key] = tensor
    return out, flat


def write_for_engine(peft_dir: str, out_dir: str, engine: Engine, dtype: Optional[torch.dtype] = None) -> int:
    """Write the PEFT adapter in ``peft_dir`` folded for ``engine`` into ``out_dir`` (cast to
    ``dtype`` for floating-point tensors when given); return the minimal ``max_lora_rank``.
    Everything is checked before ``out_dir`` is written."""
    folded, flat, rank = for_engine(read_adapter_tensors(peft_dir), LoraConfig.from_pretrained(peft_dir), engine,
                                    dtype, where=peft_dir)
    write_adapter_dir(out_dir, folded, flat)
    return rank


def for_engine(
    tensors: dict[str, torch.Tensor], config: LoraConfig, engine: Engine, dtype: Optional[torch.dtype] = None,
    where: str = "the adapter",
) -> tuple[dict[str, torch.Tensor], LoraConfig, int]:
    """The PEFT release ``tensors`` / ``config`` folded for ``engine`` in fp32 and cast to
    ``dtype`` (floating-point tensors, when given), contiguous; its config; the minimal
    ``max_lora_rank``. What the engine cannot serve is refused first (naming ``where``)."""
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    ranks = module_ranks(tensors)
    check_servable(config, engine, list(ranks), where=where)
    rank = max_lora_rank(config, ranks, engine)
    folded, flat = fold_scaling(tensors, config)
    if dtype is not None:
        folded = {k: v.to(dtype) if v.is_floating_point() else v for k, v in folded.items()}
    return {k: v.contiguous() for k, v in folded.items()}, flat, rank


def read_adapter_tensors(adapter_dir: str) -> dict[str, torch.Tensor]:
    """The tensors of the PEFT adapter in ``adapter_dir`` (a ConsolidationError if unreadable)."""
    try:
        return read_adapter_file(os.path.join(adapter_dir, WEIGHTS_NAME))
    except (FileNotFoundError, ValueError) as e:
        raise ConsolidationError(str(e)) from None
