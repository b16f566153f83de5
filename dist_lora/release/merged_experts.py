"""The merged export of an adapter on fused expert / router parameters (PEFT ``target_parameters``).

A base checkpoint of a transformers 5 MoE model holds the experts in one of two layouts
(:mod:`dist_lora.bridges.gpt`): per-expert tensors (``...experts.e.w1.weight`` /
``mlp.experts.e.gate_proj.weight``, what ``save_pretrained`` writes) or the fused 3-D
parameters (``mlp.experts.gate_up_proj`` [E, 2I, H]). For a targeted parameter P with stacked
factors (:mod:`dist_lora.expert_layout`) expert e's update is ``ΔW_e = s · B_e A_e`` [out, in]
(s = alpha / r of P's rank and alpha); it is added

* to the fused tensor P itself (all experts; transposed for an ``is_transposed`` module), or
* to the per-expert tensor of each part of P's family-table entry: part i of an entry with k
  HF parts takes rows [i·out/k, (i+1)·out/k) of ΔW_e (gate_up_proj[e] = [gate; up]).

The router weight (a 2-D parameter, PEFT's E = 1) merges as a linear layer's weight. Which base
tensor belongs to which parameter comes from the bridge's family table (the one home of the
names).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..bridges import parse_hf_config, read_hf_config
from ..checkpoint.peft_format import PREFIX
from ..config import LoraConfig
from ..expert_layout import parameter_geometry, peft_parameter_key, unstack_experts
from ..layers import math as lm
from .errors import ConsolidationError
from .experts import ROUTER, target_parameter
from .hf_model import hf_modules


class ParameterDeltas:
    """The target-parameter adapters of a consolidated PEFT adapter, applied to base tensors by
    name (:meth:`merged`); ``get(key)`` reads an adapter tensor and marks it used."""

    def __init__(self, config: LoraConfig, hf_model_dir: str, get: Callable[[str], Optional[torch.Tensor]]) -> None:
        self.config, self._get = config, get
        self.family = parse_hf_config(read_hf_config(hf_model_dir)).family
        modules = hf_modules(hf_model_dir)
        targeted = [f"{m}.{p}" for m, described in modules.items() for p in described[1]
                    if any(f"{m}.{p}" == t or f"{m}.{p}".endswith("." + t) for t in config.target_parameters or ())]
        self._params: dict[str, tuple[str, tuple, bool]] = {}  # full parameter -> (PEFT key, shape, transposed)
        for name in targeted:
            module, short = name.rsplit(".", 1)
            order = [p for p in modules[module][1] if f"{module}.{p}" in targeted]
            self._params[name] = (PREFIX + peft_parameter_key(module, short, order), modules[module][1][short],
                                  modules[module][3])
        self._factors: dict[str, tuple[dict, float]] = {}

    def merged(self, name: str, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """Base tensor ``name`` with its parameter adapter merged (fp32 sum, cast back); None if
        no targeted parameter covers it."""
        if name in self._params:  # the fused layout (or the router): the parameter itself
            factors = self._factors_of(name)
            if factors is None:
                return None
            delta = torch.stack([self._delta(factors, e) for e in range(len(factors[0]))])
            if len(self._params[name][1]) == 2:
                delta = delta[0]
            elif self._params[name][2]:
                delta = delta.transpose(1, 2)
            return lm.merged_weight(tensor, [(delta, None)]).to(tensor.dtype)
        module, _, kind = name.rpartition(".")
        if kind != "weight":
            return None
        try:
            mapped, position = self.family.modules.hf(module)
        except KeyError:
            return None
        if mapped.expert is None and mapped.entry.megatron != ROUTER:
            return None
        parameter, _ = target_parameter(self.family, mapped.megatron)
        factors = self._factors_of(parameter) if parameter in self._params else None
        if factors is None:
            return None
        delta = self._delta(factors, mapped.expert or 0)
        rows = delta.shape[0] // len(mapped.hf)
        delta = delta[position * rows:(position + 1) * rows]
        if delta.shape != tensor.shape:
            raise ConsolidationError(
                f"{name}: the adapter's ΔW part is {tuple(delta.shape)}, the base tensor {tuple(tensor.shape)}."
            )
        return lm.merged_weight(tensor, [(delta, None)]).to(tensor.dtype)

    @staticmethod
    def _delta(factors: tuple[dict, float], expert: int) -> torch.Tensor:
        a, b = factors[0][expert]
        return lm.delta_weight(a, b, factors[1])

    def _factors_of(self, parameter: str) -> Optional[tuple[dict, float]]:
        """({e: (A_e, B_e)}, scaling) of ``parameter`` (read once: adapter-sized), or None
        without factors in the file."""
        if parameter not in self._factors:
            key, shape, transposed = self._params[parameter]
            a, b = self._get(f"{key}.lora_A.weight"), self._get(f"{key}.lora_B.weight")
            if a is None or b is None:
                return None
            experts = parameter_geometry(shape, transposed)[0]
            scaling = lm.lora_scaling(self.config.alpha_for(parameter), a.shape[0] // experts, self.config.use_rslora)
            self._factors[parameter] = (unstack_experts(a, b, experts), scaling)
        return self._factors[parameter]
