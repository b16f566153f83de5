"""Translate a Hugging Face PEFT LoRA adapter to megatron module names (no megatron needed).

A PEFT adapter (written by PEFT, or by :func:`dist_lora.release.consolidate.consolidate`) for a
Llama-family HF model becomes the full (TP=1 layout) factors of the megatron GPTModel built
from that HF model (:func:`dist_lora.bridges.build_megatron_gpt`), with a config to create the
adapter with. :mod:`.to_megatron` loads the result into a model at any TP/PP layout.

Mapping (``model.layers.N.`` -> ``decoder.layers.N.``, global layer index)::

    self_attn.{q,k,v}_proj  -> self_attention.linear_qkv   (fused, grouped rows: merge_qkv_rows)
    mlp.{gate,up}_proj      -> mlp.linear_fc1              (fused, [gate; up]: merge_gate_up)
    self_attn.o_proj        -> self_attention.linear_proj  (as is)
    mlp.down_proj           -> mlp.linear_fc2              (as is)

The fused layouts (A shared by the parts, or stacked) are described in :mod:`.fuse`.

A transformers 5 mixture of experts' ``target_parameters`` (fused expert parameters, router
weight) become per-expert ``linear_fc1`` / ``linear_fc2`` and ``mlp.router`` factors
(:mod:`.translate_experts`).

The config is translated: ``target_modules`` becomes the sorted list of full global megatron
module names, ``rank_pattern`` / ``alpha_pattern`` explicit per-module entries wherever the
fused rank / alpha differs from ``r`` / ``lora_alpha`` (:func:`.peft.explicit_targets`);
``layers_to_transform``, ``layers_pattern``, ``exclude_modules`` and ``megatron_config`` become
None.

Refused, with the offending key or field named: keys that are not LoRA factors of the decoder
layers' linear modules (``lm_head`` / ``embed_tokens`` LoRA, ``modules_to_save`` tensors,
trained base biases), DoRA, base-weight-changing inits (PiSSA, OLoRA, CorDA, LoftQ), factors
whose shapes or layer indices do not fit the HF model, a config whose targets differ from the
file's modules (PEFT would silently leave them out) and a rank in the file that disagrees with
the config.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..bridges import (
    DEFAULT_MODULES,
    HF_LAYERS,
    HFLlamaArch,
    Mapped,
    hf_features,
    incomplete_adapter,
    is_megatron_name,
    layer_module_name,
    parse_hf_config,
    read_hf_config,
    split_layer_name,
)
from ..checkpoint.peft_format import PREFIX, WEIGHTS_NAME, read_adapter_file
from ..config import ConfigError, LoraConfig
from ..layers.math import lora_scaling
from ..targeting import HF_DEFAULT_TARGETS, is_targeted
from .checks import linear_adapter_keys, rank_mismatch
from .fuse import FusedFactors, Part, fuse
from .peft import explicit_targets, released_config
from .sources import LINEAR_SUFFIXES, split_key
from .translate_experts import translate_target_parameters

# From the bridge's table: the HF linear modules of a decoder layer (megatron LoRA targets) and
# the model-level ones (embedding, head), which the loader refuses.
_LAYER_LINEARS = DEFAULT_MODULES.hf_layer_linears()
_TOP_LEVEL = DEFAULT_MODULES.hf_model_linears()


class PeftToMegatronError(ConfigError):
    """The PEFT adapter cannot be loaded into the megatron model; the message says why and
    names the key, module or field."""


@dataclasses.dataclass
class MegatronAdapter:
    """A PEFT adapter translated to megatron module names: the config to create the adapter
    with, and each module's full factors (slice them with the layer's ``shard_a``/``shard_b``)."""

    config: LoraConfig
    modules: dict[str, FusedFactors]  # global megatron module name -> factors
    arch: HFLlamaArch

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full tensors under PEFT-style keys with global megatron names
        (``base_model.model.decoder.layers.0.self_attention.linear_qkv.lora_A.weight``), the
        layout of ``consolidate(..., format="megatron")``."""
        out = {}
        for name, factors in self.modules.items():
            out[f"{PREFIX}{name}.lora_A.weight"] = factors.a
            out[f"{PREFIX}{name}.lora_B.weight"] = factors.b
            if factors.bias is not None:
                out[f"{PREFIX}{name}.lora_B.bias"] = factors.bias
        return out


def translate_peft_adapter(
    adapter_dir: str | os.PathLike, hf_model_dir: str | os.PathLike
) -> MegatronAdapter:
    """Read and check a PEFT adapter for the Llama-family HF model in ``hf_model_dir`` and
    translate it to megatron modules (full tensors, see the module docstring). One process,
    no megatron needed. Raises :class:`PeftToMegatronError` naming what does not fit."""
    adapter_dir, hf_model_dir = os.fspath(adapter_dir), os.fspath(hf_model_dir)
    config = _read_config(adapter_dir)
    arch = parse_hf_config(read_hf_config(hf_model_dir))
    tensors = read_adapter_file(os.path.join(adapter_dir, WEIGHTS_NAME))
    expert_modules, tensors = translate_target_parameters(
        tensors, config, arch.family, arch.num_layers, getattr(arch, "num_experts", 0), hf_model_dir, PeftToMegatronError)
    parts = _parts(tensors, config, arch, hf_model_dir)  # names a modules_to_save key, if any
    if not parts and not expert_modules:
        raise PeftToMegatronError("the adapter file holds no LoRA factors.")
    if config.modules_to_save:
        raise PeftToMegatronError(
            f"{adapter_dir}: modules_to_save={config.modules_to_save} is not supported by the megatron loader "
            "(only LoRA factors of the decoder layers' linear modules are mapped)."
        )
    _check_targets(config, arch, set(parts), adapter_dir)

    grouped: dict[str, tuple[Mapped, dict[int, Part]]] = {}
    for module, part in parts.items():
        mapped, position = arch.family.modules.hf(module)
        grouped.setdefault(mapped.megatron, (mapped, {}))[1][position] = part
    modules = {}
    for megatron_name in sorted(grouped, key=_module_order):
        mapped, fused_parts = grouped[megatron_name]
        modules[megatron_name] = fuse(mapped, fused_parts, arch, config.use_rslora)
    modules = {name: (modules.get(name) or expert_modules[name]) for name in sorted({*modules, *expert_modules}, key=_module_order)}
    return MegatronAdapter(_translated_config(config, modules, hf_model_dir), modules, arch)


def _module_order(name: str) -> tuple[int, str]:
    parsed = split_layer_name(name)
    return (parsed[0] if parsed else -1, name)


def _read_config(adapter_dir: str) -> LoraConfig:
    try:
        config = LoraConfig.from_pretrained(adapter_dir)
    except ConfigError as e:
        raise PeftToMegatronError(f"{adapter_dir}: {e}") from None
    if config.use_dora:
        raise PeftToMegatronError(
            f"{adapter_dir}: DoRA adapters (use_dora=True) are not supported by the megatron loader."
        )
    if config.init_kind.rewrites_base:
        raise PeftToMegatronError(
            f"{adapter_dir}: init_lora_weights={config.init_lora_weights!r} changes the base weights; this adapter is only valid "
            "with those changed weights (convert it to a plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion first)."
        )
    if config.layer_replication:
        raise PeftToMegatronError(f"{adapter_dir}: layer_replication={config.layer_replication} is not supported.")
    return config


def _factor_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.<suffix>`` -> (module, suffix), refusing what is not a
    LoRA factor."""
    if not key.startswith(PREFIX):
        raise PeftToMegatronError(
            f"{key!r} is not a PEFT adapter key (expected base_model.model.<module>.lora_A.weight / lora_B.weight)."
        )
    rest = key[len(PREFIX):]
    module, suffix = split_key(rest)
    if is_megatron_name(module):
        raise PeftToMegatronError(
            f"{key!r} uses a megatron module name: this is a megatron-format adapter (consolidate "
            "--format megatron); load it with LoraModel.from_pretrained / load_adapter instead."
        )
    for top in _TOP_LEVEL:
        if rest == top or rest.startswith(top + "."):
            raise PeftToMegatronError(
                f"{key!r}: {top} is not supported by the megatron loader: it maps LoRA on the decoder layers' "
                f"q/k/v/o and gate/up/down projections only (not LoRA on {top}, modules_to_save copies of it, or "
                "embedding weights PEFT saves with save_embedding_layers)."
            )
    if suffix in LINEAR_SUFFIXES:
        return module, suffix
    if "lora_magnitude_vector" in rest:
        raise PeftToMegatronError(f"{key!r}: DoRA adapters are not supported by the megatron loader.")
    if "lora_embedding_" in rest:
        raise PeftToMegatronError(f"{key!r}: LoRA on embeddings is not supported by the megatron loader.")
    raise PeftToMegatronError(
        f"{key!r} is not a LoRA factor (modules_to_save tensors, trained base biases with bias='all'/"
        "'lora_only', trainable tokens, ... are not supported by the megatron loader)."
    )


def _parts(
    tensors: dict[str, torch.Tensor], config: LoraConfig, arch: HFLlamaArch, hf_model_dir: str
) -> dict[str, Part]:
    """HF module -> its checked adapter."""
    features = hf_features(arch.family, arch)  # HF layer submodule -> (in, out)
    by_module: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        module, suffix = _factor_key(key)
        parsed = split_layer_name(module, HF_LAYERS, anywhere=False)
        if parsed is None or parsed[1] not in features:
            raise PeftToMegatronError(
                f"{key!r}: {module!r} is not a module of a Llama-family model that the megatron bridge maps "
                f"({HF_LAYERS}.N.{{{', '.join(features)}}}): an adapter for a different architecture?"
            )
        if parsed[0] >= arch.num_layers:
            raise PeftToMegatronError(
                f"{key!r} is for layer {parsed[0]}, but the HF model at {hf_model_dir} has {arch.num_layers} "
                "layers (num_hidden_layers): an adapter for a different model?"
            )
        by_module.setdefault(module, {})[suffix] = (key, tensors[key])

    want = linear_adapter_keys(config)  # no DoRA: refused with the config
    parts = {}
    for module, found in sorted(by_module.items()):
        problem = incomplete_adapter(
            module, set(found), want, name=lambda s: f"{PREFIX}{module}.{s}", note=f" (lora_bias={config.lora_bias})"
        )
        if problem:
            raise PeftToMegatronError(problem)
        (a_key, a), (b_key, b) = found["lora_A.weight"], found["lora_B.weight"]
        bias_key, bias = found.get("lora_B.bias", (None, None))
        n_in, n_out = features[split_layer_name(module, HF_LAYERS)[1]]
        for key, tensor in ((a_key, a), (b_key, b), (bias_key, bias)):
            if tensor is not None and not tensor.is_floating_point():
                raise PeftToMegatronError(f"{key!r} has dtype {tensor.dtype}; LoRA factors are floating point.")
        if a.dim() != 2 or a.shape[1] != n_in:
            raise PeftToMegatronError(
                f"{a_key!r} has shape {list(a.shape)}, but {module} of the HF model at {hf_model_dir} has "
                f"in_features {n_in} (expected [r, {n_in}]): an adapter for a different model?"
            )
        r = a.shape[0]
        if b.dim() != 2 or tuple(b.shape) != (n_out, r):
            raise PeftToMegatronError(
                f"{b_key!r} has shape {list(b.shape)}, expected [{n_out}, {r}] ({module} of the HF model at "
                f"{hf_model_dir} has out_features {n_out}; rank {r} from lora_A): an adapter for a different model?"
            )
        if bias is not None and tuple(bias.shape) != (n_out,):
            raise PeftToMegatronError(f"{bias_key!r} has shape {list(bias.shape)}, expected [{n_out}].")
        problem = rank_mismatch(config, module, r)
        if problem:
            raise PeftToMegatronError(f"{a_key!r} has rank {r}, but {problem}; the file and its config disagree.")
        alpha = config.alpha_for(module)
        parts[module] = Part(module, a, b, bias, r, alpha, lora_scaling(alpha, r, config.use_rslora))
    return parts


def _check_targets(config: LoraConfig, arch: HFLlamaArch, present: set[str], adapter_dir: str) -> None:
    """The modules PEFT would give an adapter (its matching rules on the HF model's names) must
    be exactly the modules with tensors in the file: PEFT leaves a targeted module without
    tensors at its init, and silently ignores tensors of modules it does not target."""
    spec = config.target_modules
    if spec is None and config.target_parameters:  # PEFT: target_parameters alone target no module
        spec = []
    if spec is None:
        spec = HF_DEFAULT_TARGETS.get(arch.model_type)
    if spec is None:  # pragma: no cover - every supported architecture has PEFT defaults
        raise PeftToMegatronError(f"{adapter_dir}: target_modules is not set.")
    candidates = [layer_module_name(i, sub, HF_LAYERS) for i in range(arch.num_layers) for sub in _LAYER_LINEARS]
    targeted = {  # "all-linear" takes neither the output head nor the embedding
        name
        for name in candidates + list(_TOP_LEVEL)
        if is_targeted(config, name, spec, all_linear_takes=name not in _TOP_LEVEL, full_name_skips_layers=True)
    }
    top = sorted(targeted & set(_TOP_LEVEL))
    if top:
        raise PeftToMegatronError(
            f"{adapter_dir}: target_modules={spec!r} targets {top}; LoRA on the output head / embedding is not "
            "supported by the megatron loader."
        )
    missing, extra = sorted(targeted - present), sorted(present - targeted)
    if missing:
        raise PeftToMegatronError(
            f"{adapter_dir}: adapter_config.json targets {missing[:4]}{' ...' if len(missing) > 4 else ''} "
            f"(target_modules={spec!r}), but the file has no LoRA factors for them (an incomplete file?)."
        )
    if extra:
        raise PeftToMegatronError(
            f"{adapter_dir}: the file has LoRA factors for {extra[:4]}{' ...' if len(extra) > 4 else ''}, which "
            f"adapter_config.json does not target (target_modules={spec!r}); PEFT would silently ignore them."
        )


def _translated_config(config: LoraConfig, modules: dict[str, FusedFactors], hf_model_dir: str) -> LoraConfig:
    ranks = {name: f.r for name, f in modules.items()}
    alphas = {name: f.lora_alpha for name, f in modules.items()}
    return released_config(
        config,
        hf_model_dir,
        inference_mode=config.inference_mode,  # the loader sets it from is_trainable
        modules_to_save=None,
        fan_in_fan_out=False,  # PEFT ignores it for nn.Linear: the saved factors are [r, in] / [out, r]
        megatron_core="megatron.core",
        target_parameters=None,  # the expert and router parameters are megatron modules here
        **explicit_targets(config, ranks, alphas, order=_module_order),
    )
