"""LoRA on token embeddings: ``nn.Embedding`` (PEFT's ``lora.Embedding``, same math and files).

An embedding lookup is a linear map of a one-hot token, E[x] = Eᵀ onehot(x), with the weight
E stored [num_embeddings, embedding_dim]: a fan_in_fan_out weight with in = num_embeddings
(the vocabulary V) and out = embedding_dim (d). PEFT's adapter on it is

    y = E[x] + s · Aᵀ[x] Bᵀ,     A ∈ R^{r×V} (lora_embedding_A),  B ∈ R^{d×r} (lora_embedding_B)

so A is [r, in] and B [out, r], the shapes of a linear adapter, and everything the base class
does with fan_in_fan_out is already right: ΔE = s·(B A)ᵀ for merge/unmerge, DoRA's magnitude
m [d] with the norm of W + ΔW taken over the vocabulary. The r-sized lookup Aᵀ[x] is scaled
(as :func:`dist_lora.layers.math.lora_down` does) and B applied with
:func:`~dist_lora.layers.math.lora_up`. What differs from the linear layers, all as PEFT:

- init (full factors from one seed, see :func:`init_embedding_factors`): True / "gaussian":
  A = 0, B ~ N(0, 1); False: A, B ~ N(0, 1). Weight- and data-driven inits and ``lora_bias``
  are refused (PEFT refuses lora_bias; it silently falls back to the default init for the rest);
- no dropout: the input is token ids (PEFT creates the dropout module but never applies it);
- saved as ``<module>.lora_embedding_A`` / ``lora_embedding_B`` (:data:`FACTOR_KEYS`, no
  ``.weight``); internally the factors live in ``lora_A`` / ``lora_B`` like every layer's;
- a base layer that scales its output (``embed_scale``, e.g. Gemma's) scales the adapter's too.

megatron's VocabParallelEmbedding is in :mod:`dist_lora.layers.parallel_embedding`.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, InitKind, InitValue, LoraConfig
from ..parallel import zero
from . import math as lm
from .base import LoraLayer
from .kinds import base_module, embedding_kind

# PEFT's saved names of an embedding adapter's (A, B); linear layers save "lora_A.weight" / "lora_B.weight".
FACTOR_KEYS = ("lora_embedding_A", "lora_embedding_B")
# What PEFT's save_pretrained adds for a targeted embedding (save_embedding_layers): its base weight.
SAVED_BASE_WEIGHT = "base_layer.weight"


def init_embedding_factors(
    r: int, num_embeddings: int, embedding_dim: int, init: InitValue, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full fp32 A [r, V] and B [d, r] from one seed (PEFT's embedding init: the update
    starts at zero with A = 0 and a random B; ``init=False`` draws both)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(r, num_embeddings, generator=gen) if init is False else torch.zeros(r, num_embeddings)
    b = torch.randn(embedding_dim, r, generator=gen)
    return a, b


def check_embedding_targets(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    """Refuse, before any layer is wrapped, a config that an embedding among ``targets``
    cannot take (the error names the module and the field)."""
    for name in targets:
        module = model.get_submodule(name)
        module = base_module(module)
        if embedding_kind(module) is not None:
            _check_embedding_config(name, module, config.lora_bias, config.init_lora_weights)


def _check_embedding_config(where: str, module: nn.Module, lora_bias: bool, init: InitValue) -> None:
    what = f"{where}: {type(module).__name__}"
    if lora_bias:
        raise ConfigError(
            f"lora_bias=True is not supported for embedding layers ({what}), as in PEFT; "
            "set lora_bias=False or leave the embedding out of target_modules."
        )
    if not InitKind.of(init).seeded:  # True, False, "gaussian": A and B drawn from the seed
        raise ConfigError(
            f"init_lora_weights={init!r} is not supported for embedding layers ({what}): use "
            "True, False or 'gaussian', or leave the embedding out of target_modules (exclude_modules)."
        )
    weight = getattr(module, "weight", None)
    if weight is not None and zero.is_zero3_param(weight):
        raise ConfigError(
            f"LoRA on an embedding under DeepSpeed ZeRO-3 is not supported ({what}); leave it out of "
            "target_modules or use ZeRO-1/2."
        )


def embed_scale(base_layer: nn.Module) -> Optional[torch.Tensor]:
    """The scalar an embedding multiplies its output by (``embed_scale``, e.g. Gemma's scaled
    word embedding), or None (PEFT's ``_get_embed_scale``)."""
    scale = getattr(base_layer, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base_layer.weight.device, dtype=base_layer.weight.dtype)
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            return scale
        warnings.warn(f"{type(base_layer).__name__}.embed_scale has shape {tuple(scale.shape)}, not a scalar; ignoring it.")
    return None


class LoraEmbedding(LoraLayer):
    """y = E[x] + Σ_active s · Aᵀ[x] Bᵀ on an ``nn.Embedding`` (see the module docstring)."""

    factor_keys = FACTOR_KEYS

    def __init__(self, base_layer: nn.Module) -> None:
        zero.refuse_registered(base_layer, f"cannot wrap {type(base_layer).__name__} in LoRA")
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)

    @property
    def fan_in_fan_out(self) -> bool:
        return True  # the weight is stored [in = num_embeddings, out = embedding_dim]

    @property
    def weight(self) -> torch.Tensor:
        """The base embedding weight (code that ties or reads ``embedding.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def lora_embedding_A(self) -> dict[str, nn.Parameter]:
        """PEFT's view: adapter -> A [r, num_embeddings] (read-only mapping; held in ``lora_A``)."""
        return {name: module.weight for name, module in self.lora_A.items()}

    @property
    def lora_embedding_B(self) -> dict[str, nn.Parameter]:
        """PEFT's view: adapter -> B [embedding_dim, r] (read-only mapping; held in ``lora_B``)."""
        return {name: module.weight for name, module in self.lora_B.items()}

    def update_layer(self, adapter_name: str, *args, **kwargs) -> None:
        """:meth:`LoraLayer.update_layer`; refuses ``lora_bias`` and inits other than True /
        False / "gaussian" (as :func:`check_embedding_targets` does for a whole model)."""
        bound = inspect.signature(LoraLayer.update_layer).bind(self, adapter_name, *args, **kwargs)
        bound.apply_defaults()
        init, lora_bias = bound.arguments["init_lora_weights"], bound.arguments["lora_bias"]
        _check_embedding_config(f"adapter {adapter_name!r}", self.base_layer, lora_bias, init)
        super().update_layer(adapter_name, *args, **kwargs)

    def init_factors(self, r: int, init: InitValue, seed: int, lora_bias: bool):
        a, b = init_embedding_factors(r, self.in_features, self.out_features, init, seed)
        return a, b, None

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``table`` ([V, ·]) with the base layer's options (PEFT's ``_embed``)."""
        base = self.base_layer
        return F.embedding(
            ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )

    def _adapter_output(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """s · Aᵀ[ids] Bᵀ, in the adapter's dtype (the scale applied to the r-sized lookup)."""
        h = self._lookup(ids, self.lora_A[name].weight.t()) * self.scaling[name]
        return lm.lora_up(h, self.lora_B[name].weight, None, self.scaling[name])

    def _add_adapters(self, out: torch.Tensor, ids: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """``out`` (the base lookup, or this rank's partial one) plus each adapter's term; DoRA
        adds (m/n - 1) · E[x] + (m/n) · s · Aᵀ[x] Bᵀ (:func:`lm.dora_output`)."""
        base_out, scale = out, embed_scale(self.base_layer)
        for name in adapters:
            delta = self._adapter_output(ids, name)
            if scale is not None:
                delta = delta * scale.to(delta.dtype)
            if self.is_dora(name):
                delta = lm.dora_output(base_out, delta, self._dora_scale(name))
            out = out + delta.to(out.dtype)
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapters = self._forward_adapters()
        return self._add_adapters(result, x, adapters) if adapters else result
