"""Load a Hugging Face PEFT LoRA adapter into a tensor/pipeline-parallel megatron GPTModel.

The inverse of :mod:`dist_lora.checkpoint.consolidate`: a PEFT adapter (written by PEFT, or
by ``consolidate``) for a Llama-family HF model becomes an adapter on the megatron model built
from that HF model (:func:`dist_lora.bridges.build_megatron_gpt`), at any TP size, computing
the PEFT model's function exactly (to fp32 rounding).

Mapping (``model.layers.N.`` -> ``decoder.layers.N.``, global layer index)::

    self_attn.{q,k,v}_proj  -> self_attention.linear_qkv   (fused, grouped rows: merge_qkv_rows)
    mlp.{gate,up}_proj      -> mlp.linear_fc1              (fused, [gate; up]: merge_gate_up)
    self_attn.o_proj        -> self_attention.linear_proj  (as is)
    mlp.down_proj           -> mlp.linear_fc2              (as is)

A fused module's adapter must compute ``Σ_i s_i B_i A_i x`` on the rows of part i. Two exact
layouts (parts absent from the file have B_i = 0 and, for lora_bias, a zero bias):

* **shared** -- every present part has the *same* A (``torch.equal``) and the same scaling
  (what ``consolidate`` writes for a fused megatron adapter): A' = A, B' = the parts' B rows
  merged, rank r and alpha unchanged. No arithmetic: a PEFT file written by ``consolidate``
  round-trips bit for bit.
* **stacked** -- otherwise (PEFT's q/k/v have independent A's; or the ranks/alphas differ):
  R = Σ r_i over present parts, A' = [A_q; A_k; A_v] (rows stacked, absent parts add none),
  part i's B rows are ``[0 .. B_i·c_i .. 0]`` (its r_i columns at its offset) with
  c_i = s_i / s_f, then merged. Then s_f B'A' = Σ_i s_i B_i A_i on each part's rows. The fused
  scale s_f: when all present parts share one scaling s and an alpha with
  ``lora_scaling(alpha, R) == s`` exists (alpha = s·R, or s·sqrt(R) with rsLoRA, checked
  exactly in float), s_f = s and B is copied unscaled; else alpha = R (sqrt(R) with rsLoRA),
  so s_f = 1 exactly and each block is pre-multiplied by its s_i (in fp32).
  lora_B.bias rows follow the same rule (they are scaled by s like B h).

The config is translated: ``target_modules`` becomes the sorted list of full global megatron
module names, ``rank_pattern`` / ``alpha_pattern`` explicit per-module entries wherever the
fused rank / alpha differs from ``r`` / ``lora_alpha``; ``layers_to_transform``,
``layers_pattern``, ``exclude_modules`` and ``megatron_config`` become None.

Refused, before the model is touched, with the offending key or field named: keys that are not
LoRA factors of the decoder layers' linear modules (``lm_head`` / ``embed_tokens`` LoRA,
``modules_to_save`` tensors, trained base biases), DoRA, base-weight-changing inits (PiSSA,
OLoRA, CorDA, LoftQ), factors whose shapes or layer indices do not fit the HF model, a config
whose targets differ from the file's modules (PEFT would silently leave them out), a rank in
the file that disagrees with the config, and a megatron model whose geometry differs from the
HF model's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import TYPE_CHECKING, Optional

import torch

from ..bridges import (
    DEFAULT_MODULES,
    HF_LAYERS,
    HFLlamaArch,
    Mapped,
    hf_features,
    incomplete_adapter,
    layer_module_name,
    megatron_geometry_mismatch,
    merge_fused,
    parse_hf_config,
    read_hf_config,
    split_layer_name,
)
from ..config import ConfigError, LoraConfig, explicit_pattern
from ..layers.math import lora_scaling
from ..naming import global_module_name
from ..targeting import HF_DEFAULT_TARGETS, is_targeted
from .peft_format import PREFIX, WEIGHTS_NAME, read_adapter_file, resolve_parameter, set_tensor

if TYPE_CHECKING:
    from ..model import LoraModel

LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias")
# From the bridge's table: the HF linear modules of a decoder layer (megatron LoRA targets) and
# the model-level ones (embedding, head), which the loader refuses.
_LAYER_LINEARS = DEFAULT_MODULES.hf_layer_linears()
_TOP_LEVEL = DEFAULT_MODULES.hf_model_linears()


class PeftToMegatronError(ConfigError):
    """The PEFT adapter cannot be loaded into the megatron model; the message says why and
    names the key, module or field."""


# ---------------------------------------------------------------------------------------------
# Translated adapter (no megatron, no process group)


@dataclasses.dataclass(frozen=True)
class FusedFactors:
    """The full (unsharded, TP=1 layout) factors of one megatron module's adapter."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    bias: Optional[torch.Tensor]  # [out] with lora_bias
    r: int
    lora_alpha: float
    layout: str  # "single" (o_proj/down_proj), "shared" or "stacked" (see the module docstring)
    parts: tuple[str, ...]  # the HF modules it holds, in fused order


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


@dataclasses.dataclass
class _Part:
    """One HF module's adapter from the file."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    bias: Optional[torch.Tensor]
    r: int
    alpha: float
    scale: float


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
    parts = _parts(tensors, config, arch, hf_model_dir)  # names a modules_to_save key, if any
    if config.modules_to_save:
        raise PeftToMegatronError(
            f"{adapter_dir}: modules_to_save={config.modules_to_save} is not supported by the megatron loader "
            "(only LoRA factors of the decoder layers' linear modules are mapped)."
        )
    _check_targets(config, arch, set(parts), adapter_dir)

    grouped: dict[str, tuple[Mapped, dict[int, _Part]]] = {}
    for module, part in parts.items():
        mapped, position = arch.family.modules.hf(module)
        grouped.setdefault(mapped.megatron, (mapped, {}))[1][position] = part
    modules = {}
    for megatron_name in sorted(grouped, key=_module_order):
        mapped, fused_parts = grouped[megatron_name]
        modules[megatron_name] = _fuse(mapped, fused_parts, arch, config.use_rslora)
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


def _split_key(key: str) -> tuple[str, str]:
    """``base_model.model.<module>.<suffix>`` -> (module, suffix), refusing what is not a
    LoRA factor."""
    if not key.startswith(PREFIX):
        raise PeftToMegatronError(
            f"{key!r} is not a PEFT adapter key (expected base_model.model.<module>.lora_A.weight / lora_B.weight)."
        )
    rest = key[len(PREFIX):]
    if rest.startswith(("decoder.", "embedding.", "output_layer")):
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
    for suffix in LORA_SUFFIXES:
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
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
) -> dict[str, _Part]:
    """HF module -> its checked adapter."""
    features = hf_features(arch.family, arch)  # HF layer submodule -> (in, out)
    by_module: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        module, suffix = _split_key(key)
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

    want = {"lora_A.weight", "lora_B.weight"} | ({"lora_B.bias"} if config.lora_bias else set())
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
        if r != config.rank_for(module):
            raise PeftToMegatronError(
                f"{a_key!r} has rank {r}, but adapter_config.json gives {module} rank {config.rank_for(module)} "
                f"(r={config.r}, rank_pattern={config.rank_pattern}); the file and its config disagree."
            )
        alpha = config.alpha_for(module)
        parts[module] = _Part(module, a, b, bias, r, alpha, lora_scaling(alpha, r, config.use_rslora))
    if not parts:
        raise PeftToMegatronError("the adapter file holds no LoRA factors.")
    return parts


def _check_targets(config: LoraConfig, arch: HFLlamaArch, present: set[str], adapter_dir: str) -> None:
    """The modules PEFT would give an adapter (its matching rules on the HF model's names) must
    be exactly the modules with tensors in the file: PEFT leaves a targeted module without
    tensors at its init, and silently ignores tensors of modules it does not target."""
    spec = config.target_modules
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


# ---------------------------------------------------------------------------------------------
# Fusing q/k/v and gate/up


def _fuse(mapped: Mapped, parts: dict[int, _Part], arch: HFLlamaArch, rslora: bool) -> FusedFactors:
    """One megatron module's factors from its HF parts' (see the module docstring)."""
    names = tuple(parts[i].module for i in sorted(parts))
    if len(mapped.hf) == 1:
        p = parts[0]
        return FusedFactors(p.a, p.b, p.bias, p.r, p.alpha, "single", names)
    features = hf_features(arch.family, arch)
    out_dims = [features[split_layer_name(hf, HF_LAYERS)[1]][1] for hf in mapped.hf]
    present = [parts[i] for i in sorted(parts)]
    first = present[0]
    with_bias = first.bias is not None
    shared = all(torch.equal(p.a, first.a) and p.scale == first.scale for p in present[1:]) and all(
        p.a.dtype == first.a.dtype for p in present
    )
    if shared:
        rank, alpha, s_f = first.r, first.alpha, first.scale
        a, layout = first.a, "shared"
        offsets = {i: 0 for i in parts}
    else:
        rank = sum(p.r for p in present)
        alpha, s_f = _fused_alpha(present, rank, rslora)
        a = torch.cat([p.a.to(_common_dtype(p.a for p in present)) for p in present], dim=0)
        layout, offsets, offset = "stacked", {}, 0
        for i in sorted(parts):
            offsets[i], offset = offset, offset + parts[i].r
    folded = any(p.scale != s_f for p in present)
    dtype = torch.float32 if folded else _common_dtype(p.b for p in present)
    dtype = torch.promote_types(dtype, _common_dtype(p.b for p in present))

    def blocks(get) -> list[torch.Tensor]:
        out = []
        for i, rows in enumerate(out_dims):
            part = parts.get(i)
            tensor = None if part is None else get(part)
            shape = (rows, rank) if get is _b else (rows,)
            if tensor is None:
                out.append(torch.zeros(shape, dtype=dtype))
                continue
            value = tensor.to(dtype)
            if part.scale != s_f:
                value = value * (part.scale / s_f)
            if get is _b and layout == "stacked":
                block = torch.zeros(shape, dtype=dtype)
                block[:, offsets[i] : offsets[i] + part.r] = value
                value = block
            out.append(value)
        return out

    b = merge_fused(mapped.entry.fused, blocks(_b), arch.attention)
    bias = merge_fused(mapped.entry.fused, blocks(_bias), arch.attention) if with_bias else None
    return FusedFactors(a.contiguous(), b.contiguous(), bias, rank, alpha, layout, names)


def _b(part: _Part) -> torch.Tensor:
    return part.b


def _bias(part: _Part) -> Optional[torch.Tensor]:
    return part.bias


def _common_dtype(tensors) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _tidy(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _fused_alpha(present: list[_Part], rank: int, rslora: bool) -> tuple[float, float]:
    """(alpha, scaling) of a stacked fused adapter of rank ``rank``: the parts' common scaling
    when an alpha reproduces it exactly, else 1 (alpha = rank, or sqrt(rank) with rsLoRA)."""
    norm = math.sqrt(rank) if rslora else rank
    scales = {p.scale for p in present}
    if len(scales) == 1:
        scale = scales.pop()
        alpha = _tidy(scale * norm)
        if lora_scaling(alpha, rank, rslora) == scale:
            return alpha, scale
    alpha = _tidy(norm)
    return alpha, lora_scaling(alpha, rank, rslora)  # x / x: exactly 1.0


# ---------------------------------------------------------------------------------------------
# Config


def _translated_config(config: LoraConfig, modules: dict[str, FusedFactors], hf_model_dir: str) -> LoraConfig:
    ranks = {name: f.r for name, f in modules.items()}
    alphas = {name: f.lora_alpha for name, f in modules.items()}
    data = config.to_dict()
    data.update(
        target_modules=sorted(modules, key=_module_order),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
        rank_pattern=explicit_pattern(ranks, config.r),
        alpha_pattern=explicit_pattern(alphas, config.lora_alpha),
        fan_in_fan_out=False,  # PEFT ignores it for nn.Linear: the saved factors are [r, in] / [out, r]
        init_lora_weights=True,  # the weights come from the file
        megatron_config=None,
        megatron_core="megatron.core",
        base_model_name_or_path=hf_model_dir,
    )
    return LoraConfig.from_dict(data)




# ---------------------------------------------------------------------------------------------
# Loading into the megatron model


def load_peft_adapter_into_megatron(
    model: "LoraModel | torch.nn.Module",
    adapter_dir: str | os.PathLike,
    hf_model_dir: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> "LoraModel":
    """Load the PEFT adapter in ``adapter_dir`` (for the HF model in ``hf_model_dir``) into a
    megatron GPTModel built from that HF model, at any TP/PP layout; every rank calls it.

    ``model`` is a bare GPTModel (it is wrapped with :func:`dist_lora.get_lora_model` using the
    translated config; ``adapter_name`` becomes the active adapter) or a :class:`LoraModel`
    around one (the adapter is added, not activated: ``set_adapter`` it, as with PEFT's
    ``load_adapter``). ``is_trainable=False`` freezes the adapter (inference mode).
    Returns the LoraModel. All checks run before the model is changed; if loading fails after
    the adapter was created, it is removed again (and a bare model unwrapped).
    """
    from ..model import LoraModel, get_lora_model

    adapter = translate_peft_adapter(adapter_dir, hf_model_dir)
    config = adapter.config
    config.inference_mode = not is_trainable
    gpt = model.model if isinstance(model, LoraModel) else model
    while not hasattr(gpt, "decoder") and isinstance(getattr(gpt, "module", None), torch.nn.Module):
        gpt = gpt.module  # megatron DDP / Float16Module wrappers
    _check_model(gpt, adapter.arch, os.fspath(hf_model_dir))
    if isinstance(model, LoraModel):
        model.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
        lora_model, flags = model, None
    else:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            lora_model = get_lora_model(model, config, adapter_name, low_cpu_mem_usage=True, seed=0)
        except Exception:
            _restore(flags)
            raise
    try:
        _assign(lora_model, adapter, adapter_name, os.fspath(adapter_dir))
    except Exception:
        lora_model.discard_adapter(adapter_name)
        if flags is not None:
            _restore(flags)
        raise
    lora_model.mark_trainable()
    return lora_model


def _restore(flags: list[tuple[torch.nn.Parameter, bool]]) -> None:
    for param, requires_grad in flags:
        param.requires_grad_(requires_grad)


def _check_model(gpt: torch.nn.Module, arch: HFLlamaArch, hf_model_dir: str) -> None:
    config = getattr(gpt, "config", None)
    if config is None or not hasattr(gpt, "decoder") or not hasattr(config, "num_query_groups"):
        raise TypeError(
            f"load_peft_adapter_into_megatron needs a megatron GPTModel (or a LoraModel around one), got "
            f"{type(gpt).__name__}; for a Hugging Face model use LoraModel.from_pretrained / load_adapter."
        )
    differing = megatron_geometry_mismatch(config, arch)
    if differing:
        raise PeftToMegatronError(
            f"the megatron model does not match the HF model at {hf_model_dir}: {', '.join(differing)}. "
            "Build it from that checkpoint (build_megatron_gpt)."
        )


@torch.no_grad()
def _assign(lora_model: "LoraModel", adapter: MegatronAdapter, adapter_name: str, source: str) -> None:
    """Slice each module's full factors to this rank's shard and set them; every check
    first, then the updates."""
    updates, seen = [], set()
    stage = {
        global_name
        for name, _ in lora_model.model.named_modules()
        if name and (global_name := _global_layer_module(lora_model.model, name)) is not None
    }
    for name, layer in lora_model.lora_layers():
        if adapter_name not in layer.lora_A:
            continue
        global_name = _global_layer_module(lora_model.model, name)
        factors = adapter.modules.get(global_name) if global_name else None
        if factors is None:  # pragma: no cover - the config targets exactly adapter.modules
            raise PeftToMegatronError(f"module {name} got adapter {adapter_name!r} but {source} has no factors for it.")
        seen.add(global_name)
        if factors.a.shape[1] != layer.in_features or factors.b.shape[0] != layer.out_features:
            raise PeftToMegatronError(
                f"{global_name}: the adapter's factors are [{factors.r}, {factors.a.shape[1]}] / "
                f"[{factors.b.shape[0]}, {factors.r}], the layer has in/out features "
                f"{layer.in_features}/{layer.out_features}."
            )
        pieces = [("lora_A.weight", layer.shard_a(factors.a)), ("lora_B.weight", layer.shard_b(factors.b))]
        if factors.bias is not None:
            pieces.append(("lora_B.bias", layer.shard_b(factors.bias)))
        for path, value in pieces:
            sub, pname = resolve_parameter(layer, path, adapter_name)
            expected = tuple(getattr(sub, pname).shape)
            if tuple(value.shape) != expected:
                raise PeftToMegatronError(
                    f"{global_name}.{path}: this rank's shard has shape {tuple(value.shape)}, the model expects "
                    f"{expected}."
                )
            updates.append((sub, pname, value))
    unassigned = sorted(set(adapter.modules) & stage - seen)
    if unassigned:  # pragma: no cover - the config targets exactly adapter.modules
        raise PeftToMegatronError(f"modules {unassigned[:4]} of this pipeline stage got no adapter.")
    for sub, pname, value in updates:
        set_tensor(sub, pname, value)


def _global_layer_module(model: torch.nn.Module, name: str) -> Optional[str]:
    """``decoder.layers.<global N>.<submodule>`` of a local module name (any prefix before
    ``decoder.layers`` dropped), None outside the decoder layers."""
    parsed = split_layer_name(global_module_name(model, name))
    return layer_module_name(*parsed) if parsed else None
