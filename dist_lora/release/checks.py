"""Checks of an adapter's tensors against its config and the HF model's config, before
anything is written. Each raises :class:`.errors.ConsolidationError` naming the tensor, module
or config field."""

from __future__ import annotations

from typing import Optional

from ..bridges import HFLlamaArch, incomplete_adapter, layer_module_name, megatron_features, split_layer_name
from ..config import ConfigError, LoraConfig
from ..layers.base import LoraLayer
from ..layers.embedding import FACTOR_KEYS as EMBEDDING_FACTOR_KEYS
from ..replication import expand_ranges
from ..targeting import MEGATRON_GPT_DEFAULT_TARGETS, is_targeted
from .errors import ConsolidationError
from .sources import A_SUFFIXES, LORA_SUFFIXES, Source

CONVERSION_HINT = (
    " Pass the checkpoint saved before training as initial_checkpoint_dir (--initial) to release it "
    "as a plain LoRA adapter of rank 2r."
)


def check_releasable(config: LoraConfig, conversion_hint: str = "") -> None:
    """Refuse an init that rewrites the base weights (PiSSA, OLoRA, CorDA, LoftQ): its adapter
    is only valid on the rewritten base. ``conversion_hint`` (how to release it converted to
    plain LoRA) is added for the inits that convert."""
    kind = config.init_kind
    if kind.rewrites_base:
        hint = conversion_hint if kind.convertible else ""
        raise ConsolidationError(
            f"init_lora_weights={kind.value!r} changes the base weights during training; such an adapter is only "
            f"valid on those changed weights.{hint}"
        )


def check_factors(sources: dict[str, Source], config: LoraConfig) -> None:
    """Every adapted module has both factors (and a B bias exactly when lora_bias is set)."""
    present: dict[str, set[str]] = {}
    for source in sources.values():
        if source.suffix in LORA_SUFFIXES:
            present.setdefault(source.module, set()).add(source.suffix)
    dora = {"lora_magnitude_vector"} if config.use_dora else set()  # DoRA's m [out]: split like B's rows
    for module, suffixes in sorted(present.items()):
        want = {*EMBEDDING_FACTOR_KEYS} | dora if suffixes & {*EMBEDDING_FACTOR_KEYS} else linear_adapter_keys(config)
        problem = incomplete_adapter(module, suffixes, want, note=f" (lora_bias={config.lora_bias})")
        if problem:
            raise ConsolidationError(problem)


def linear_adapter_keys(config: LoraConfig) -> set[str]:
    """The tensors of a linear layer's adapter under ``config``: A and B, B's bias with
    lora_bias, DoRA's magnitude with use_dora."""
    bias = {"lora_B.bias"} if config.lora_bias else set()
    return {*LoraLayer.factor_keys} | bias | ({"lora_magnitude_vector"} if config.use_dora else set())


def rank_mismatch(config: LoraConfig, module: str, rank: int) -> Optional[str]:
    """None when ``rank`` is ``module``'s rank in ``config``, else what the config says."""
    expected = config.rank_for(module)
    if rank == expected:
        return None
    return f"adapter_config.json gives {module} rank {expected} (r={config.r}, rank_pattern={config.rank_pattern})"


def check_ranks(config: LoraConfig, sources: dict[str, Source]) -> dict[str, int]:
    """module -> rank (rows of its A), checked against the config's rank_for(module)."""
    ranks = {}
    for source in sources.values():
        if source.suffix in A_SUFFIXES:
            rank = source.global_shape[0]
            problem = rank_mismatch(config, source.module, rank)
            if problem:
                raise ConsolidationError(
                    f"{source.key} has rank {rank}, but the checkpoint's {problem}; the alpha of this module cannot "
                    "be trusted either."
                )
            ranks[source.module] = rank
    return ranks


# ---------------------------------------------------------------------------------------------
# Megatron-named adapters against the HF config


def expanded_layers(config: LoraConfig, num_layers: int, hf_model_dir: str) -> int:
    """The number of layers the adapters sit on: with layer_replication, the expanded stack's
    (PEFT expands the HF model the same way before loading)."""
    if not config.layer_replication:
        return num_layers
    try:
        return len(expand_ranges(config.layer_replication, num_layers))
    except ConfigError as e:
        raise ConsolidationError(f"the HF model at {hf_model_dir} does not fit the checkpoint's {e}") from None


def _layer_of(module: str) -> Optional[int]:
    parsed = split_layer_name(module)
    return parsed[0] if parsed else None


def _layer_sub(module: str) -> Optional[str]:
    """The submodule of a decoder layer: ``decoder.layers.3.mlp.linear_fc1`` -> ``mlp.linear_fc1``."""
    parsed = split_layer_name(module)
    return parsed[1] if parsed else None


def check_geometry(sources: dict[str, Source], arch: HFLlamaArch, config: LoraConfig, hf_model_dir: str) -> None:
    """Compare the HF config with the shapes and layers of megatron-named adapters; the error
    says which field."""
    problems: dict[str, str] = {}
    num_layers = expanded_layers(config, arch.num_layers, hf_model_dir)
    layers = sorted({layer for s in sources.values() if (layer := _layer_of(s.module)) is not None})
    if layers and layers[-1] >= num_layers:
        problems["num_hidden_layers"] = (
            f"the HF model has {num_layers} layers, the checkpoint has adapters on layer {layers[-1]}"
        )
    elif layers:  # would the adapter config have targeted the HF model's later layers too?
        spec = config.target_modules if config.target_modules is not None else MEGATRON_GPT_DEFAULT_TARGETS
        subs = sorted({sub for s in sources.values() if (sub := _layer_sub(s.module)) is not None})
        wanted = [
            layer
            for layer in range(layers[-1] + 1, num_layers)
            for sub in subs
            if is_targeted(config, layer_module_name(layer, sub), spec)
        ]
        if wanted:
            problems["num_hidden_layers"] = (
                f"the HF model has {num_layers} layers, the checkpoint's adapters stop at layer {layers[-1]} "
                f"although its config targets layer {wanted[0]} too"
            )
    problems.update(_shape_problems(sources, arch))
    if problems:
        raise ConsolidationError(
            f"the HF model at {hf_model_dir} does not match the checkpoint: "
            + "; ".join(f"{field}: {text}" for field, text in problems.items())
            + "."
        )


def _shape_problems(sources: dict[str, Source], arch: HFLlamaArch) -> dict[str, str]:
    """HF config field -> how the checkpoint's LoRA factor shapes disagree with it (the
    features of each decoder-layer module come from the bridge's family table)."""
    family, problems = arch.family, {}
    expect = megatron_features(family, arch)  # submodule -> ((in, dimension), (out, dimension))
    qkv_rows = next(expect[e.megatron][1][0] for e in family.modules.layer if e.fused == "qkv")
    field_text = {
        "hidden_size": f"hidden_size={arch.hidden_size}",
        "attention heads": (
            f"num_attention_heads={arch.num_attention_heads}, num_key_value_heads={arch.num_query_groups}, "
            f"head_dim={arch.head_dim} (q/k/v rows {qkv_rows}, o_proj in_features "
            f"{family.size('q', arch)})"
        ),
        "intermediate_size": f"intermediate_size={arch.ffn_hidden_size}",
    }
    for source in sources.values():
        sub = _layer_sub(source.module)
        if sub not in expect or source.suffix not in LORA_SUFFIXES:
            continue
        (n_in, in_dim), (n_out, out_dim) = expect[sub]
        in_field, out_field = family.field(in_dim), family.field(out_dim)
        if source.suffix == "lora_A.weight":
            got, want, field = source.global_shape[1], n_in, in_field
        else:
            got, want, field = source.global_shape[0], n_out, out_field
        if got != want and field not in problems:
            what = "in_features" if source.suffix == "lora_A.weight" else "out_features"
            problems[field] = f"HF {field_text[field]}, but {source.key} has {what} {got} (expected {want})"
    return problems
