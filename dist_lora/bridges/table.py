"""The form of a model-family table, and the name and geometry look-ups every bridge user shares.

A family (:mod:`dist_lora.bridges.families`) is data: which HF ``model_type`` it serves, how
its ``config.json`` fields map to megatron's, and a :class:`ModuleTable` of entries, one per
megatron module::

    Module(megatron="self_attention.linear_qkv",                  # under decoder.layers.N
           hf=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # under model.layers.N
           tp="column",                                            # how TP splits the weight
           fused="qkv",                                            # how the HF parts' rows fuse
           features=(("hidden", "q"), ("hidden", "kv"), ("hidden", "kv")))  # (in, out) of each part

Everything else is derived from the entries: HF <-> megatron module names
(:meth:`ModuleTable.megatron` / :meth:`ModuleTable.hf`), megatron's tensor-parallel markers
(:attr:`Module.partition`), the in/out features of each module (:func:`hf_features`,
:func:`megatron_features`) and the fused row layouts (:mod:`.layouts`, by ``fused``).

Decoder-layer modules are named ``<layers>.<N>.<submodule>`` on both sides with a global
layer index N; :func:`split_layer_name` is the one parser of such names.

Mixture-of-experts layers add two kinds of entry:

* an *expert-indexed* entry: its names hold the placeholder ``{expert}`` (:data:`EXPERT`),
  which stands for a GLOBAL expert index on both sides::

    Module(megatron="mlp.experts.local_experts.{expert}.linear_fc1",
           hf=("block_sparse_moe.experts.{expert}.w1", "block_sparse_moe.experts.{expert}.w3"),
           tp="column", fused="gate_up", features=(("hidden", "moe_ffn"),) * 2,
           v5="mlp.experts.gate_up_proj")

  ``hf`` names the per-expert tensors (the layout ``save_pretrained`` writes and the Hub
  uses); ``v5`` names transformers 5's fused 3-D parameter holding every expert's parts
  stacked on dim 0 and concatenated along dim 1 in ``hf`` order (``gate_up_proj``
  [E, 2·I, H] = [gate_e; up_e] per expert, ``down_proj`` [E, H, I]). megatron's local name
  carries this rank's LOCAL expert index J; :func:`dist_lora.naming.global_expert_index` gives the global one.
  Its TP split is over megatron's expert-tensor-parallel group.
* a plain entry with ``v5``: the module's transformers 5 name where the older checkpoints use
  another (Mixtral's router ``block_sparse_moe.gate`` is ``mlp.gate`` in transformers 5).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional

MEGATRON_LAYERS = "decoder.layers"
HF_LAYERS = "model.layers"
TP_KINDS = ("column", "row", "vocab", "replicated")
FUSED_LAYOUTS = ("none", "qkv", "gate_up")
EXPERT = "{expert}"  # the global expert index in an expert-indexed entry's names


@dataclasses.dataclass(frozen=True)
class Module:
    """One megatron module and the HF module(s) it holds.

    ``tp``: "column" (output rows split over TP, dim 0), "row" (input columns split, dim 1),
    "vocab" (vocabulary rows split, dim 0) or "replicated" (every rank holds all of it).
    ``fused``: how the rows of several HF parts make the megatron rows ("qkv": per query
    group, "gate_up": [gate; up] per TP shard; "none": one part), see :mod:`.layouts`.
    ``features``: per HF part, the (in, out) dimension names of the family's geometry.
    ``tied``: the HF module(s) to read instead when the word embeddings are tied.
    ``v5``: transformers 5's name where it differs from ``hf`` (see the module docstring):
    for an expert-indexed entry the 3-D parameter holding all experts, else the module.
    """

    megatron: str
    hf: tuple[str, ...]
    tp: str = "replicated"
    fused: str = "none"
    features: tuple[tuple[str, str], ...] = ()
    tied: tuple[str, ...] = ()
    v5: str = ""

    def __post_init__(self) -> None:
        if self.tp not in TP_KINDS or self.fused not in FUSED_LAYOUTS:
            raise ValueError(
                f"{self.megatron}: tp {self.tp!r} / fused {self.fused!r} not in {TP_KINDS} / {FUSED_LAYOUTS}."
            )
        if self.features and len(self.features) != len(self.hf):
            raise ValueError(f"{self.megatron}: one (in, out) feature pair per HF part is needed.")
        if any((EXPERT in name) != self.per_expert for name in self.hf):
            raise ValueError(f"{self.megatron}: {EXPERT} must be in the megatron and every HF name, or in none.")

    @property
    def per_expert(self) -> bool:
        """An expert-indexed entry: one module per expert, split over expert parallelism."""
        return EXPERT in self.megatron

    @property
    def partition(self) -> Optional[tuple[int, int]]:
        """megatron's tensor-parallel marker (partition dim, stride), None when replicated."""
        if self.tp == "replicated":
            return None
        return (1, 1) if self.tp == "row" else (0, 2 if self.fused == "gate_up" else 1)


class Mapped(NamedTuple):
    """A module name resolved against a table: the entry, the global megatron name, the full
    HF names in fused order, the layer index (None for model-level modules), the global
    expert index (None unless the entry is expert-indexed) and the full transformers 5 name
    (``""`` when the entry has none)."""

    entry: Module
    megatron: str
    hf: tuple[str, ...]
    layer: Optional[int]
    expert: Optional[int] = None
    v5: str = ""


def split_layer_name(name: str, layers: str = MEGATRON_LAYERS, anywhere: bool = True) -> Optional[tuple[int, str]]:
    """(layer index, submodule) of ``[prefix.]<layers>.<N>.<submodule>``, else None:
    ``decoder.layers.3.mlp.linear_fc1`` -> (3, ``mlp.linear_fc1``). ``anywhere=False``
    refuses a prefix before ``layers``."""
    prefix = r"(?:.*\.)?" if anywhere else ""
    m = re.fullmatch(prefix + re.escape(layers) + r"\.(\d+)\.(.+)", name)
    return (int(m[1]), m[2]) if m else None


def layer_module_name(index: int, submodule: str, layers: str = MEGATRON_LAYERS) -> str:
    """``<layers>.<index>.<submodule>``: the inverse of :func:`split_layer_name`."""
    return f"{layers}.{index}.{submodule}"


def _expert_pattern(template: str) -> re.Pattern[str]:
    before, after = template.split(EXPERT)
    return re.compile(re.escape(before) + r"(\d+)" + re.escape(after))


def _ends_with(name: str, top: str) -> bool:
    return name == top or name.endswith("." + top)


@dataclasses.dataclass(frozen=True)
class ModuleTable:
    """The modules of one decoder architecture: ``layer`` entries repeat in every decoder
    layer, ``model`` entries sit at the top of the model (embedding, final norm, head)."""

    layer: tuple[Module, ...]
    model: tuple[Module, ...]

    @functools.cached_property
    def _by_megatron_sub(self) -> dict[str, Module]:
        return {entry.megatron: entry for entry in self.layer}

    @functools.cached_property
    def _by_hf_sub(self) -> dict[str, tuple[Module, int]]:
        return {hf: (entry, i) for entry in self.layer for i, hf in enumerate(entry.hf)}

    @functools.cached_property
    def _expert_patterns(self) -> tuple[tuple[re.Pattern[str], Module, int], ...]:
        """(pattern of a submodule name, entry, HF part or -1 for megatron) of expert entries."""
        out = []
        for entry in self.layer:
            if entry.per_expert:
                out.append((_expert_pattern(entry.megatron), entry, -1))
                out.extend((_expert_pattern(hf), entry, i) for i, hf in enumerate(entry.hf))
        return tuple(out)

    def _layer_entry(self, sub: str, hf: bool) -> Optional[tuple[Module, int, Optional[int]]]:
        """(entry, HF part (-1 for a megatron name), global expert or None) of a decoder-layer
        submodule name on the HF (``hf``) or the megatron side; None if no entry has it."""
        plain = self._by_hf_sub.get(sub) if hf else (self._by_megatron_sub.get(sub), -1)
        if plain is not None and plain[0] is not None and not plain[0].per_expert:
            return (*plain, None)
        for pattern, entry, part in self._expert_patterns:
            m = pattern.fullmatch(sub)
            if m and (part != -1) == hf:
                return entry, part, int(m[1])
        return None

    def megatron(self, name: str) -> Mapped:
        """Resolve a global megatron module name (any prefix, ``module.`` or a PEFT wrapper's,
        is dropped; an expert-indexed module carries its GLOBAL expert index); raises
        KeyError naming the known modules."""
        parsed = split_layer_name(name)
        found = self._layer_entry(parsed[1], hf=False) if parsed is not None else None
        if found is not None:
            layer, (entry, _, expert) = parsed[0], found
            fill = (lambda n: n) if expert is None else (lambda n: n.replace(EXPERT, str(expert)))
            hf = tuple(layer_module_name(layer, fill(part), HF_LAYERS) for part in entry.hf)
            v5 = layer_module_name(layer, entry.v5, HF_LAYERS) if entry.v5 else ""
            return Mapped(entry, layer_module_name(layer, fill(entry.megatron)), hf, layer, expert, v5)
        for entry in self.model:
            if _ends_with(name, entry.megatron):
                return Mapped(entry, entry.megatron, entry.hf, None)
        raise KeyError(f"{name!r} is not a megatron GPT module this bridge maps; known: {self.known_megatron()}.")

    def hf(self, name: str) -> tuple[Mapped, int]:
        """Resolve an HF module name (any prefix before ``model.`` / ``lm_head`` is dropped) to
        its megatron module and its position among that module's HF parts."""
        parsed = split_layer_name(name, HF_LAYERS)
        found = self._layer_entry(parsed[1], hf=True) if parsed is not None else None
        if found is not None:
            layer, (entry, position, expert) = parsed[0], found
            sub = entry.megatron if expert is None else entry.megatron.replace(EXPERT, str(expert))
            return self.megatron(layer_module_name(layer, sub)), position
        for entry in self.model:
            for position, hf in enumerate(entry.hf):
                if _ends_with(name, hf):
                    return Mapped(entry, entry.megatron, entry.hf, None), position
        raise KeyError(
            f"{name!r} is not an HF module this bridge maps; known: "
            f"{HF_LAYERS}.N.{{{', '.join(self._by_hf_sub)}}}, {', '.join(hf for e in self.model for hf in e.hf)}."
        )

    def known_megatron(self) -> str:
        """The megatron modules this table maps, for error messages."""
        layer = ", ".join(self._by_megatron_sub)
        return f"{MEGATRON_LAYERS}.N.{{{layer}}}, {', '.join(e.megatron for e in self.model)}"

    def hf_layer_linears(self) -> tuple[str, ...]:
        """The HF submodules of a decoder layer that are linear layers (LoRA targets)."""
        return tuple(hf for entry in self.layer if entry.features for hf in entry.hf)

    def hf_model_linears(self) -> tuple[str, ...]:
        """The model-level HF modules with weights LoRA could target (embedding, head)."""
        return tuple(hf for entry in self.model if entry.features for hf in entry.hf)


@dataclasses.dataclass(frozen=True)
class MoEKeys:
    """Where a mixture-of-experts family's ``config.json`` keeps its MoE facts.

    ``num_experts``: the keys of the expert count (the first present wins);
    ``ffn``: one expert's intermediate size; ``norm_topk_prob``: the switch that renormalises
    the top-k probabilities to sum 1 (None: always renormalised); ``sparse_step`` /
    ``dense_layers``: every n-th layer is MoE / the layers with a dense MLP instead (None:
    every layer is MoE).
    """

    num_experts: tuple[str, ...]
    ffn: str
    norm_topk_prob: Optional[str] = None
    sparse_step: Optional[str] = None
    dense_layers: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family: the HF ``model_type`` / architecture it serves, its config rules and
    field mapping, the named dimensions of its geometry and its module table.

    ``config_fields``: (parsed-arch field, HF config.json key, megatron TransformerConfig field).
    ``megatron_config``: TransformerConfig fields that are fixed for the family.
    ``qkv_bias``: q/k/v always carry biases (else an ``attention_bias`` config is refused).
    ``sliding_window_flag`` / ``sliding_window_size``: the config key that switches sliding
    window attention on, or the key of a window size that must cover the whole context.
    ``dimensions``: name -> (size from the parsed arch, the config field it comes from).
    ``moe``: where the config keeps the mixture-of-experts facts (None: a dense model).
    ``config_defaults``: parsed-arch field -> value for a geometry key missing from config.json
    where the family's transformers config class has its own default (else it is derived).
    """

    model_type: str
    architecture: str
    modules: ModuleTable
    config_fields: tuple[tuple[str, str, str], ...]
    megatron_config: Mapping[str, Any]
    dimensions: Mapping[str, tuple[Callable[[Any], int], str]]
    qkv_bias: bool = False
    sliding_window_flag: Optional[str] = None
    sliding_window_size: Optional[str] = None
    moe: Optional[MoEKeys] = None
    config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def size(self, dimension: str, arch: Any) -> int:
        """The size of a named dimension for a parsed config."""
        return self.dimensions[dimension][0](arch)

    def field(self, dimension: str) -> str:
        """The config field(s) a named dimension comes from, as error messages name them."""
        return self.dimensions[dimension][1]


def hf_features(family: ModelFamily, arch: Any) -> dict[str, tuple[int, int]]:
    """HF decoder-layer submodule -> (in_features, out_features), for linear modules."""
    return {
        hf: (family.size(n_in, arch), family.size(n_out, arch))
        for entry in family.modules.layer
        for hf, (n_in, n_out) in zip(entry.hf, entry.features)
    }


def megatron_features(family: ModelFamily, arch: Any) -> dict[str, tuple[tuple[int, str], tuple[int, str]]]:
    """megatron decoder-layer submodule -> ((in_features, its dimension), (out_features, the
    dimension of its first part)): a fused module's output rows are its parts' rows together
    (linear_qkv: (heads + 2·groups)·head_dim, linear_fc1: 2·ffn)."""
    out = {}
    for entry in family.modules.layer:
        if entry.features:
            n_in = entry.features[0][0]
            rows = sum(family.size(n_out, arch) for _, n_out in entry.features)
            out[entry.megatron] = ((family.size(n_in, arch), n_in), (rows, entry.features[0][1]))
    return out
