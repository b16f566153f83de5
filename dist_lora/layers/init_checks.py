"""Checks, before any layer is created or any base weight rewritten, that every target can
take the config's init: the one place :meth:`LoraModel.add_adapter` asks.

An init that rewrites the base (:attr:`dist_lora.config.InitKind.rewrites_base`: PiSSA / OLoRA
/ CorDA / LoftQ) changes each target's weight in turn, so a target that cannot take it must be
refused before the first one changes. Per target (named by its global module name):

  every such init   a float32/float16/bfloat16 base weight (e.g. not a bitsandbytes 4-bit one);
                    r <= min(in_features, out_features)
  "corda"           CorDA data of this rank's shape on the layer (``preprocess_corda`` first)
  "loftq"           bitsandbytes importable, a supported bit width, whole NF4 blocks per TP shard
"""

from __future__ import annotations

from torch import nn

from ..config import LoraConfig
from ..factors.checks import check_base_dtype, check_rank_fits
from ..factors.corda_math import check_stored
from ..factors.loftq import bnb_functional, check_bits, check_shard_blocks
from ..naming import global_module_name
from .kinds import LinearGeometry, base_module, linear_geometry

_LOFTQ_HINT = " (for a model already quantised with bitsandbytes use replace_lora_weights_loftq)"


def check_init_targets(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    """Refuse (ValueError / TypeError / ImportError naming the module) a target of ``model``
    that ``config``'s init cannot run on; no-op for inits that leave the base weight alone."""
    kind = config.init_kind
    if not kind.rewrites_base:
        return
    if kind.method == "loftq":
        bnb_functional()
        check_bits(config.loftq_config.loftq_bits)
    for name in targets:
        module = base_module(model.get_submodule(name))
        key = global_module_name(model, name)
        r = config.rank_for(key)
        geometry = linear_geometry(module)
        if kind.method == "corda":
            _check_corda_data(module, key, r, geometry)
        check_base_dtype(module.weight.dtype, kind.value, key, _LOFTQ_HINT if kind.method == "loftq" else "")
        check_rank_fits(r, geometry.in_features, geometry.out_features, kind.value, key)  # of a float weight's shape
        if kind.method == "loftq":
            out_local, in_local = geometry.local_shape(module)
            check_shard_blocks(out_local, in_local, geometry.layout, geometry.size, geometry.stride, key)


def _check_corda_data(module: nn.Module, key: str, r: int, geometry: LinearGeometry) -> None:
    """The layer holds ``corda_eigens`` (left by ``preprocess_corda``) of the right shapes for r."""
    eigens = getattr(module, "corda_eigens", None)
    if eigens is None:
        raise ValueError(
            f"init_lora_weights='corda': {key!r} has no CorDA data; run "
            "dist_lora.init.preprocess_corda(model, config, run_model) first."
        )
    out_local, in_local = geometry.local_shape(module)
    want = {"u": (out_local, r), "s": (r,), "v": (in_local, r)}
    for field, shape in want.items():
        check_stored(
            getattr(eigens, field), shape, f"init_lora_weights='corda': {key!r} CorDA {field}",
            "run preprocess_corda with the same model and config (r, rank_pattern, target_modules).",
        )
