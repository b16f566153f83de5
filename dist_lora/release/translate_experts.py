"""A PEFT adapter's ``target_parameters`` on a transformers 5 MoE model -> megatron expert and router modules.

The inverse of :mod:`.experts` (no megatron needed). PEFT 0.21 adapts the fused expert
parameters ``model.layers.N.mlp.experts.gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]
and the router weight ``model.layers.N.mlp.gate.weight`` [E, H] with stacked factors
(:mod:`dist_lora.expert_layout`: lora_A [r·E, in] expert-major, lora_B [out, r·E] rank-major,
keys nested per :func:`~dist_lora.expert_layout.peft_parameter_key`); each becomes, per global
expert e, the full factors of ``decoder.layers.N.mlp.experts.local_experts.e.linear_fc1`` (B rows
[gate; up], as ``gate_up_proj[e]``) / ``linear_fc2``, and the router's those of
``decoder.layers.N.mlp.router``. The targeted parameters follow PEFT's rule (a full name equal
to an entry or ending with ``.`` + entry) over the HF model's parameters (built on the meta
device).

Refused (a :class:`PeftToMegatronError` naming the key or entry, before any model is touched):
an entry that matches no expert or router parameter, a targeted parameter without factors, an
adapter whose expert count (stacked rank / r, or the router's lora_B rows) differs from the
model's, factors whose features do not fit the model.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..checkpoint.peft_format import PREFIX
from ..config import LoraConfig
from ..expert_layout import parameter_geometry, peft_parameter_key, unstack_experts
from ..bridges import EXPERT, HF_LAYERS, ModelFamily, Module, layer_module_name, split_layer_name
from .experts import A_KEY, B_KEY, parameter_entries
from .fuse import FusedFactors
from .hf_model import hf_modules


def translate_target_parameters(
    tensors: dict[str, torch.Tensor], config: LoraConfig, family: ModelFamily, num_layers: int, num_experts: int,
    hf_model_dir: str, error: Callable[[str], Exception],
) -> tuple[dict[str, FusedFactors], dict[str, torch.Tensor]]:
    """(megatron module -> full factors of the config's target_parameters, the other tensors).
    ``error`` builds the exception to raise (the loader's own error class)."""
    if not config.target_parameters:
        return {}, tensors
    if not num_experts:
        raise error(f"target_parameters={config.target_parameters} on a model without experts: the megatron loader maps "
                    "only the experts and routers of a mixture-of-experts model.")
    modules = hf_modules(hf_model_dir)
    entries = parameter_entries(family)
    candidates = _candidates(modules, num_layers, entries)
    targeted = [name for name in candidates if any(name == t or name.endswith("." + t) for t in config.target_parameters)]
    unmatched = [t for t in config.target_parameters if not any(n == t or n.endswith("." + t) for n in candidates)]
    if unmatched:
        raise error(
            f"target_parameters entries {unmatched} match no expert or router parameter of the HF model at "
            f"{hf_model_dir} (the megatron loader maps {HF_LAYERS}.N.{{{', '.join(entries)}}})."
        )
    rest = dict(tensors)
    out: dict[str, FusedFactors] = {}
    for name in targeted:
        module, short = name.rsplit(".", 1)
        order = [p for p in modules[module][1] if f"{module}.{p}" in targeted]
        key = PREFIX + peft_parameter_key(module, short, order)
        a, b = (rest.pop(f"{key}.{s}", None) for s in (A_KEY, B_KEY))
        if a is None or b is None:
            raise error(f"adapter_config.json targets the parameter {name}, but the file has no {key}.{A_KEY} / {B_KEY}.")
        experts, n_in, n_out = parameter_geometry(modules[module][1][short], modules[module][3])
        r, alpha = config.rank_for(name), config.alpha_for(name)
        layer = split_layer_name(name, HF_LAYERS)[0]
        entry = candidates[name]
        if not entry.per_expert:  # the router: E = 1 in PEFT's stacking, its out features are the experts
            if b.dim() == 2 and b.shape[0] != n_out:
                raise error(
                    f"{key}: the adapter holds {b.shape[0]} experts (the router's lora_B rows), but {name} of the HF "
                    f"model at {hf_model_dir} has {n_out}: an adapter for a different model?"
                )
            if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (r, n_in) or tuple(b.shape) != (n_out, r):
                raise error(
                    f"{key}: router factors {list(a.shape)} / {list(b.shape)}, but the model's router needs "
                    f"[{r}, {n_in}] / [{n_out}, {r}] ({n_out} experts, rank {r}): an adapter for a different model?"
                )
            out[layer_module_name(layer, entry.megatron)] = FusedFactors(a, b, None, r, alpha, "single", (name,))
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] % r:
            raise error(f"{key}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not stacked factors of rank {r}·E.")
        if a.shape[0] // r != experts:
            raise error(
                f"{key}: the adapter holds {a.shape[0] // r} experts (lora_A rows {a.shape[0]} / r {r}), but {name} of the "
                f"HF model at {hf_model_dir} has {experts}: an adapter for a different model?"
            )
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise error(
                f"{key}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit {name} (in {n_in}, out {n_out})."
            )
        for e, (a_e, b_e) in unstack_experts(a, b, experts).items():
            megatron = layer_module_name(layer, entry.megatron.replace(EXPERT, str(e)))
            out[megatron] = FusedFactors(a_e.contiguous(), b_e.contiguous(), None, r, alpha, "single", (name,))
    return out, rest


def _candidates(modules: dict, num_layers: int, entries: dict[str, Module]) -> dict[str, Module]:
    """The expert and router parameters the HF model has -> their family-table entries."""
    out = {}
    for layer in range(num_layers):
        for sub, entry in entries.items():
            module, short = layer_module_name(layer, sub, HF_LAYERS).rsplit(".", 1)
            if module in modules and short in modules[module][1]:
                out[f"{module}.{short}"] = entry
    return out
