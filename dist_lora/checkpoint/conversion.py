"""Convert a PiSSA / OLoRA / CorDA adapter to a plain LoRA adapter for the ORIGINAL base model.

These inits move the top of the base weight into the adapter: training runs on
W_res = W - s·B0·A0 with the adapter starting at (A0, B0). After training the model computes
W_res + s·B·A, so relative to the original W the update is

    ΔW = s·(B·A - B0·A0) = s·[B, -B0] · [A; A0]

which is a plain LoRA adapter of rank 2r: A' = [A; A0] (rows), B' = [B, -B0] (columns). The
config is rewritten so that every scaling is unchanged (:func:`converted_config`: r doubled,
alpha x2, or x√2 with rsLoRA). PEFT calls this ``path_initial_model_for_weight_conversion``.

A' and B' are computed per tensor, so the conversion works on a rank's shards as well as on
whole tensors: A's rows and B's columns (the rank dimension) are never tensor-parallel sharded.
modules_to_save tensors are kept as trained (they replace their module whatever the base);
PEFT drops them here, which silently loses them. Releasing a sharded run converted is
:func:`dist_lora.release.consolidate.consolidate` with ``initial_checkpoint_dir``.
"""

from __future__ import annotations

import copy

import torch

from ..config import ConfigError, LoraConfig


class ConversionError(ConfigError):
    """The trained and initial adapters do not describe one PiSSA/OLoRA/CorDA run."""


def check_convertible(config: LoraConfig) -> None:
    """Raise unless an adapter trained with ``config`` can be released as plain LoRA
    (:attr:`InitKind.convertible <dist_lora.config.InitKind.convertible>`; LoftQ's base is
    quantised, not W - s·B0·A0)."""
    if not config.init_kind.convertible:
        raise ConversionError(
            "only PiSSA / OLoRA / CorDA adapters convert to plain LoRA, this one has "
            f"init_lora_weights={config.init_lora_weights!r}."
        )
    if config.use_dora:
        raise ConversionError(
            "a DoRA adapter does not convert to plain LoRA: its magnitude is relative to the modified base weight."
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConversionError(
            "converting is not supported when rank_pattern or alpha_pattern is used together with "
            "use_rslora=True (as in PEFT): alpha·√2 would not keep every per-module scaling."
        )


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the converted adapter: plain init, r (and rank_pattern) doubled,
    lora_alpha (and alpha_pattern) x2 (x√2 with rsLoRA), so that every scaling is kept."""
    check_convertible(config)
    return doubled_rank(config)


def doubled_rank(config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` with plain init, r (and rank_pattern) doubled and lora_alpha (and
    alpha_pattern) x2 (x√2 with rsLoRA), unchecked (:func:`converted_config` checks first)."""
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.corda_config = None  # the released adapter needs no data pass
    config.r *= 2
    config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    if config.rank_pattern:
        config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    if config.alpha_pattern:
        config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return config


def mutated_to_plain(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], keep_others: bool = True
) -> dict[str, torch.Tensor]:
    """A' = [A; A0], B' = [B, -B0] for every LoRA factor of ``trained`` (PEFT-named keys);
    other entries are kept (``keep_others``) or dropped. ``initial`` must hold the same
    factors with the same shapes."""
    out = {}
    for key, tensor in trained.items():
        is_a, is_b = key.endswith(".lora_A.weight"), key.endswith(".lora_B.weight")
        if not (is_a or is_b):
            if key.endswith((".lora_B.bias", ".lora_magnitude_vector")):
                raise ConversionError(f"{key}: lora_bias / DoRA adapters do not convert to plain LoRA.")
            if keep_others:
                out[key] = tensor
            continue
        start = initial.get(key)
        if start is None:
            raise ConversionError(f"the initial adapter has no {key}: is it the initial state of this run?")
        if start.shape != tensor.shape:
            raise ConversionError(
                f"{key} has shape {list(tensor.shape)} after training but {list(start.shape)} initially: "
                "the initial adapter is not from this run."
            )
        start = start.to(tensor.dtype)
        out[key] = torch.cat([tensor, start], dim=0) if is_a else torch.cat([tensor, -start], dim=1)
    return out
