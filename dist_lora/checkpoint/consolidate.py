"""Turn a sharded adapter checkpoint into one PEFT adapter (``dist-lora consolidate``).

One process, no process group. The input is a directory written by
:func:`dist_lora.checkpoint.sharded.save_sharded` at any TP × PP layout; the output is
``adapter_model.safetensors`` + ``adapter_config.json``:

* ``format="peft"`` (default): what ``peft.PeftModel.from_pretrained`` loads onto the Hugging
  Face model. megatron module names are mapped to HF ones with :mod:`dist_lora.bridges`
  (Llama family). A checkpoint of a plain HF model (keys already HF module names) is only
  joined and prefixed.
* ``format="megatron"``: the same tensors under their global megatron names (TP=1 layout,
  PEFT's ``base_model.model.`` prefix), which dist_lora loads into a megatron model at any
  TP size (PP=1); no HF mapping.

Mapping of megatron LoRA factors to HF modules (``decoder.layers.N.`` -> ``model.layers.N.``)::

    self_attention.linear_qkv  A [r, h]             -> q_proj, k_proj, v_proj: A each (a copy)
                               B [(H+2G)·d, r], bias -> rows of each query group split into
                                                       q (H/G heads), k, v (split_qkv_rows)
    mlp.linear_fc1             A [r, h]             -> gate_proj, up_proj: A each
                               B [2F, r], bias      -> [gate; up] rows (split_gate_up)
    self_attention.linear_proj                      -> o_proj     (as is)
    mlp.linear_fc2                                  -> down_proj  (as is)
    embedding.word_embeddings  lora_embedding_A/B   -> model.embed_tokens (as is)

A fused adapter with A shared by q/k/v is exactly three adapters with equal A's, each of rank
r and the fused module's alpha, so the scaling is unchanged. modules_to_save tensors are
split by rows the same way. The config's ``target_modules`` becomes the sorted list of full HF
module names that have adapters (PEFT matches list entries exactly); ``rank_pattern`` /
``alpha_pattern`` (regexes over megatron names, which do not translate in general) become
explicit full-HF-name entries wherever a module's effective rank / alpha differs from ``r`` /
``lora_alpha``; ``layers_to_transform`` / ``layers_pattern`` / ``exclude_modules`` /
``megatron_config`` become None; ``init_lora_weights`` True; ``inference_mode`` True;
``base_model_name_or_path`` the ``hf_model_dir`` when given.

Streaming: the output header is computed from the manifest; then each checkpoint tensor is
assembled once from its pieces (plain file reads), and the one or more output tensors cut
from it (row ranges, no copies) are appended. Peak memory is about one assembled tensor plus
one piece, independent of the adapter's size.

Checks (all before anything is written): the manifest follows its schema with plain file
names only and is complete (a missing shard names its PP stage, TP rank and tensors),
checksums match, adapter_config.json's included (the error names the file), every tensor's
pieces cover it exactly, shard headers are valid, the HF config agrees with the checkpoint
(hidden size, layers, attention heads, intermediate size: the error says which), and every
output key names a module of the HF model (built on the meta device) with the right shape:
PEFT silently ignores keys that name nothing. While writing, a tensor with NaN/Inf values
stops the release (unless ``allow_nonfinite``). The output directory is built under a
temporary name next to ``out_dir`` and renamed into place at the end, so on any error
``out_dir`` is left as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..bridges import (
    DEFAULT_MODULES,
    HFLlamaArch,
    hf_module_names,
    incomplete_adapter,
    is_megatron_name,
    layer_module_name,
    megatron_features,
    parse_hf_config,
    read_hf_config,
    rows_to_hf,
    split_layer_name,
)
from ..config import ConfigError, LoraConfig, explicit_pattern
from ..io import AtomicDirectory, DirectoryNotEmptyError, paths_overlap
from ..layers.base import LoraLayer
from ..layers.embedding import FACTOR_KEYS as EMBEDDING_FACTOR_KEYS
from ..replication import expand_ranges, replicate_layers
from ..targeting import MEGATRON_GPT_DEFAULT_TARGETS, is_targeted
from .manifest import MANIFEST, read_adapter_config, read_manifest
from .peft_format import PREFIX, WEIGHTS_NAME
from .pieces import Scratch, ShardFiles, StoredTensor, assemble, check_coverage, index_tensors
from .safetensors_stream import DTYPES, StreamWriter, row_runs
from .training import complete_checkpoints, latest_checkpoint

FORMATS = ("peft", "megatron")
LORA_SUFFIXES = (*LoraLayer.factor_keys, "lora_B.bias", "lora_magnitude_vector", *EMBEDDING_FACTOR_KEYS)
A_SUFFIXES = (LoraLayer.factor_keys[0], EMBEDDING_FACTOR_KEYS[0])  # A [r, in] of a linear layer / an embedding


class ConsolidationError(ConfigError):
    """The checkpoint, the HF model directory or the output directory is not usable; the
    message says what is wrong and where."""


class Source(StoredTensor):
    """One global (TP=1 layout) tensor of the checkpoint (:class:`.pieces.StoredTensor`: its
    pieces; none for a source read by a ``fetch`` function), seen as a module's tensor."""

    @property
    def module(self) -> str:
        return _split_key(self.key)[0]

    @property
    def suffix(self) -> str:
        return _split_key(self.key)[1]


@dataclasses.dataclass
class Output:
    """A tensor of the written file: ``runs`` of rows of its source (None: the whole source)."""

    name: str
    shape: tuple[int, ...]
    runs: Optional[list[tuple[int, int]]]  # rows of the source, None: the whole tensor


def _split_key(key: str) -> tuple[str, str]:
    """(module, tensor suffix): ``a.b.lora_A.weight`` -> (``a.b``, ``lora_A.weight``)."""
    for suffix in LORA_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    module, _, param = key.rpartition(".")
    return module, param


# ---------------------------------------------------------------------------------------------
# Entry point


def consolidate(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    hf_model_dir: Optional[str | os.PathLike] = None,
    format: str = "peft",
    overwrite: bool = False,
    show_progress: bool = True,
    verify: bool = True,
    initial_checkpoint_dir: Optional[str | os.PathLike] = None,
    allow_nonfinite: bool = False,
) -> str:
    """Write the sharded adapter checkpoint in ``checkpoint_dir`` as one adapter into
    ``out_dir``; return ``out_dir``. ``checkpoint_dir`` may also be a training run's checkpoint
    root: its ``latest`` checkpoint is used (:func:`resolve_checkpoint_dir`).

    ``initial_checkpoint_dir``: for a PiSSA / OLoRA / CorDA run, the sharded checkpoint of the
    adapter saved before training; the output is then the plain LoRA adapter (rank 2r) that
    applies to the ORIGINAL base model (:mod:`.conversion`). Without it such runs are refused.

    ``hf_model_dir`` (an HF model directory with ``config.json``) gives the attention geometry
    needed to split a fused QKV adapter (required for ``format="peft"`` when there is one), is
    checked against the checkpoint and becomes ``base_model_name_or_path``. A non-empty
    ``out_dir`` is refused unless ``overwrite``. ``verify`` checks the sha256 sums of the shards
    and adapter_config.json. A tensor with NaN/Inf values is refused unless ``allow_nonfinite``.
    Raises :class:`ConsolidationError` (a ``ConfigError``/``ValueError``) naming the problem.
    """
    checkpoint_dir, out_dir = resolve_checkpoint_dir(checkpoint_dir), os.fspath(out_dir)
    hf_model_dir = None if hf_model_dir is None else os.fspath(hf_model_dir)
    if format not in FORMATS:
        raise ConsolidationError(f"format must be one of {FORMATS}, got {format!r}.")
    check_out_dir(out_dir, overwrite, checkpoint_dir)
    options = dict(hf_model_dir=hf_model_dir, format=format, show_progress=show_progress, verify=verify,
                   allow_nonfinite=allow_nonfinite)
    if initial_checkpoint_dir is not None:
        initial_checkpoint_dir = os.fspath(initial_checkpoint_dir)
        check_out_dir(out_dir, overwrite, initial_checkpoint_dir)
        return _consolidate_converted(checkpoint_dir, initial_checkpoint_dir, out_dir, overwrite, options)
    return _consolidate(checkpoint_dir, out_dir, overwrite=overwrite, **options)


def is_training_root(path: str | os.PathLike) -> bool:
    """A training run's checkpoint root (``<train.out_dir>/checkpoints``: ``step_N`` checkpoint
    directories and a ``latest`` pointer), not a checkpoint itself."""
    path = os.fspath(path)
    return not os.path.isfile(os.path.join(path, MANIFEST)) and bool(complete_checkpoints(path))


def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
    """The sharded checkpoint to read for ``path``: the checkpoint that a training run's root
    points to with ``latest`` (:func:`is_training_root`), else ``path`` itself."""
    path = os.fspath(path)
    if not is_training_root(path):
        return path
    try:
        found = latest_checkpoint(path)
    except ConfigError as e:
        raise ConsolidationError(f"{e} Pass one of its step_N checkpoint directories instead.") from None
    if found is None:  # pragma: no cover  (a root has a complete checkpoint)
        raise ConsolidationError(f"{path} holds no complete checkpoint: pass a step_N checkpoint directory.")
    return found


def _consolidate_converted(checkpoint_dir: str, initial_dir: str, out_dir: str, overwrite: bool, options: dict) -> str:
    """Consolidate the trained and the initial checkpoint, then convert (adapter-sized work)."""
    from .conversion import ConversionError, check_convertible, convert_adapter_dir

    run_config = _read_config(checkpoint_dir)
    try:
        check_convertible(run_config)
    except ConversionError as e:
        raise ConsolidationError(f"{checkpoint_dir}: {e}") from None
    with staged_output(out_dir, overwrite) as staging:
        with tempfile.TemporaryDirectory(dir=staging) as work:
            trained, initial = os.path.join(work, "trained"), os.path.join(work, "initial")
            _consolidate(checkpoint_dir, trained, overwrite=False, allow_base_changing=True, **options)
            _consolidate(initial_dir, initial, overwrite=False, allow_base_changing=True, **options)
            try:
                convert_adapter_dir(trained, initial, staging, run_config=run_config)
            except ConversionError as e:
                raise ConsolidationError(f"{checkpoint_dir} with initial checkpoint {initial_dir}: {e}") from None
    return out_dir


def _consolidate(
    checkpoint_dir: str,
    out_dir: str,
    hf_model_dir: Optional[str],
    format: str,
    overwrite: bool,
    show_progress: bool,
    verify: bool,
    allow_nonfinite: bool,
    allow_base_changing: bool = False,
) -> str:
    manifest = _read_manifest(checkpoint_dir, verify)
    config = _read_config(checkpoint_dir)
    sources = _sources(checkpoint_dir, manifest)
    kind = config.init_kind
    if not allow_base_changing and kind.rewrites_base:
        hint = (
            " Pass the checkpoint saved before training as initial_checkpoint_dir (--initial) to release it "
            "as a plain LoRA adapter of rank 2r."
            if kind.convertible else ""
        )
        raise ConsolidationError(
            f"init_lora_weights={kind.value!r} changes the base weights during training; such an adapter is only "
            f"valid on those changed weights.{hint}"
        )

    _check_factors(sources, config)
    megatron_names = _uses_megatron_names(sources, format)
    arch = None
    if hf_model_dir is not None and megatron_names:
        arch = _hf_arch(hf_model_dir)
        _check_geometry(sources, arch, config, hf_model_dir)
    if format == "megatron" or not megatron_names:
        groups = identity_groups(sources)
        out_config = identity_config(config, sources, hf_model_dir, rename=format == "peft")
    else:
        if arch is None and any(_fused_layout(src.module) == "qkv" for src in sources.values()):
            raise ConsolidationError(
                "the checkpoint has fused linear_qkv adapters; splitting them into q_proj/k_proj/v_proj needs "
                "the model's attention heads, key-value heads and head_dim: pass the HF model directory "
                "(--hf-model / hf_model_dir) or use --format megatron."
            )
        groups = _megatron_to_hf(sources, arch)
        out_config = _hf_config(config, sources, groups, hf_model_dir)
    names = [out.name for _, outs in groups for out in outs]
    if len(set(names)) != len(names):
        duplicated = sorted({n for n in names if names.count(n) > 1})
        raise ConsolidationError(f"several checkpoint tensors map to the same output tensor: {duplicated[:5]}.")
    if format == "peft" and hf_model_dir is not None:
        _check_against_hf_model(groups, hf_model_dir, config.layer_replication)

    groups.sort(key=lambda group: -group[0].dtype.itemsize)  # keeps every tensor's data aligned
    with staged_output(out_dir, overwrite) as staging:
        path = os.path.join(staging, WEIGHTS_NAME)
        write_adapter_file(path, groups, checkpoint_dir, show_progress, allow_nonfinite=allow_nonfinite)
        out_config.save_pretrained(staging)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Input: manifest, shard headers, pieces


@contextlib.contextmanager
def _consolidation_errors() -> Iterator[None]:
    """A ConfigError of a reader (manifest, adapter_config.json, shard files) as a ConsolidationError."""
    try:
        yield
    except ConsolidationError:
        raise
    except ConfigError as e:
        raise ConsolidationError(str(e)) from None


def _read_manifest(directory: str, verify: bool) -> dict:
    """The checked manifest (:func:`.manifest.read_manifest`: schema, plain file names, every
    adapter shard and adapter_config.json present and, with ``verify``, their sha256). Only the
    adapter matters here: optimizer and RNG files are neither read nor needed."""
    with _consolidation_errors():
        return read_manifest(directory, verify=verify, parts=("adapter",))


def _read_config(directory: str) -> LoraConfig:
    with _consolidation_errors():
        return read_adapter_config(directory)


def _sources(directory: str, manifest: dict) -> dict[str, Source]:
    """Global tensors by key (:func:`.pieces.index_tensors`), each checked to be covered
    exactly once by its pieces."""
    with _consolidation_errors():
        tensors = index_tensors(directory, manifest["files"])
        for tensor in tensors.values():
            check_coverage(tensor, manifest["layout"]["tp"])
    if not tensors:
        raise ConsolidationError(f"checkpoint {directory} holds no tensors.")
    return {key: Source(t.key, t.global_shape, t.dtype, t.pieces) for key, t in tensors.items()}


def _check_factors(sources: dict[str, Source], config: LoraConfig) -> None:
    """Every adapted module has both factors (and a B bias exactly when lora_bias is set)."""
    present: dict[str, set[str]] = {}
    for source in sources.values():
        if source.suffix in LORA_SUFFIXES:
            present.setdefault(source.module, set()).add(source.suffix)
    dora = {"lora_magnitude_vector"} if config.use_dora else set()  # DoRA's m [out]: split like B's rows
    linear = {*LoraLayer.factor_keys} | ({"lora_B.bias"} if config.lora_bias else set()) | dora
    for module, suffixes in sorted(present.items()):
        want = {*EMBEDDING_FACTOR_KEYS} | dora if suffixes & {*EMBEDDING_FACTOR_KEYS} else linear
        problem = incomplete_adapter(module, suffixes, want, note=f" (lora_bias={config.lora_bias})")
        if problem:
            raise ConsolidationError(problem)


# ---------------------------------------------------------------------------------------------
# Names, geometry and mapping


def _uses_megatron_names(sources: dict[str, Source], format: str) -> bool:
    if not any(is_megatron_name(s.module) for s in sources.values()):
        return False
    unmapped = [module for module in sorted({s.module for s in sources.values()}) if _fused_layout(module) is None]
    if unmapped and format == "peft":
        raise ConsolidationError(
            f"modules {unmapped[:3]}{' ...' if len(unmapped) > 3 else ''} have no Hugging Face counterpart in the "
            f"Llama-family bridge ({DEFAULT_MODULES.known_megatron()}); use --format megatron to keep the "
            "megatron names."
        )
    return True


def _fused_layout(module: str) -> Optional[str]:
    """The fused layout of a megatron module in the bridge's table, None if it maps no HF module."""
    try:
        return DEFAULT_MODULES.megatron(module).entry.fused
    except KeyError:
        return None


def _hf_arch(hf_model_dir: str) -> HFLlamaArch:
    try:
        return parse_hf_config(read_hf_config(hf_model_dir))
    except FileNotFoundError as e:
        raise ConsolidationError(f"--hf-model: {e}") from None
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConsolidationError(f"--hf-model: {hf_model_dir}/config.json is not a usable config ({e!r}).") from None


def _layer_of(module: str) -> Optional[int]:
    parsed = split_layer_name(module)
    return parsed[0] if parsed else None


def _layer_sub(module: str) -> Optional[str]:
    """The submodule of a decoder layer: ``decoder.layers.3.mlp.linear_fc1`` -> ``mlp.linear_fc1``."""
    parsed = split_layer_name(module)
    return parsed[1] if parsed else None


def _check_geometry(sources: dict[str, Source], arch: HFLlamaArch, config: LoraConfig, hf_model_dir: str) -> None:
    """Compare the HF config with the shapes in the checkpoint; the error says which field."""
    problems: dict[str, str] = {}
    num_layers = _expanded_layers(config, arch.num_layers, hf_model_dir)
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


def _expanded_layers(config: LoraConfig, num_layers: int, hf_model_dir: str) -> int:
    """The number of layers the adapters sit on: with layer_replication, the expanded stack's
    (PEFT expands the HF model the same way before loading)."""
    if not config.layer_replication:
        return num_layers
    try:
        return len(expand_ranges(config.layer_replication, num_layers))
    except ConfigError as e:
        raise ConsolidationError(f"the HF model at {hf_model_dir} does not fit the checkpoint's {e}") from None


def _megatron_to_hf(sources: dict[str, Source], arch: Optional[HFLlamaArch]) -> list[tuple[Source, list[Output]]]:
    """Each source's outputs under HF names: as is, A copied per fused part, or the fused
    rows split with the bridge's own layout functions (applied to row indices)."""
    attention = arch.attention if arch is not None else None
    groups = []
    for source in sources.values():
        rows = source.global_shape[0] if source.global_shape else 0
        outputs = [
            Output(f"{PREFIX}{hf}.{source.suffix}", source.global_shape, None)
            if part is None
            else Output(f"{PREFIX}{hf}.{source.suffix}", (len(part), *source.global_shape[1:]), row_runs(part))
            for hf, part in rows_to_hf(source.module, rows, attention, shared=source.suffix in A_SUFFIXES)
        ]
        groups.append((source, outputs))
    return groups


# ---------------------------------------------------------------------------------------------
# adapter_config.json


def _released(config: LoraConfig, hf_model_dir: Optional[str], **changes: Any) -> LoraConfig:
    data = config.to_dict()
    data.update(init_lora_weights=True, inference_mode=True, megatron_config=None, **changes)
    if hf_model_dir is not None:
        data["base_model_name_or_path"] = hf_model_dir
    return LoraConfig.from_dict(data)


def _check_ranks(config: LoraConfig, sources: dict[str, Source]) -> dict[str, int]:
    """module -> rank (rows of its A), checked against the config's rank_for(module)."""
    ranks = {}
    for source in sources.values():
        if source.suffix in A_SUFFIXES:
            rank, expected = source.global_shape[0], config.rank_for(source.module)
            if rank != expected:
                raise ConsolidationError(
                    f"{source.key} has rank {rank}, but the checkpoint's adapter_config.json gives {source.module} "
                    f"rank {expected} (r={config.r}, rank_pattern={config.rank_pattern}); the alpha of this "
                    "module cannot be trusted either."
                )
            ranks[source.module] = rank
    return ranks


def identity_groups(sources: dict[str, Source]) -> list[tuple[Source, list[Output]]]:
    """Each source written as it is, under PEFT's ``base_model.model.`` prefix."""
    return [(src, [Output(PREFIX + src.key, src.global_shape, None)]) for src in sources.values()]


def identity_config(
    config: LoraConfig, sources: dict[str, Source], hf_model_dir: Optional[str], rename: bool
) -> LoraConfig:
    """The released adapter_config.json for sources kept under their names (:func:`identity_groups`),
    ranks checked against ``config``; ``rename``: ``base_model_name_or_path`` becomes ``hf_model_dir``."""
    _check_ranks(config, sources)
    return _released(config, hf_model_dir if rename else None)


def _hf_config(
    config: LoraConfig, sources: dict[str, Source], groups: list, hf_model_dir: Optional[str]
) -> LoraConfig:
    ranks = _check_ranks(config, sources)
    rank_of, alpha_of, saved = {}, {}, set()
    for module, rank in ranks.items():
        for hf in hf_module_names(module):
            rank_of[hf], alpha_of[hf] = rank, config.alpha_for(module)
    for source in sources.values():
        if source.suffix not in LORA_SUFFIXES:
            saved.update(hf_module_names(source.module))
    lora_modules = sorted(rank_of)
    changes = dict(
        target_modules=lora_modules,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=sorted(saved) or None,
        rank_pattern=explicit_pattern(rank_of, config.r),
        alpha_pattern=explicit_pattern(alpha_of, config.lora_alpha),
    )
    return _released(config, hf_model_dir, **changes)




# ---------------------------------------------------------------------------------------------
# Check against the HF model


def _check_against_hf_model(groups: list, hf_model_dir: str, layer_replication: Optional[list] = None) -> None:
    """Every output key must name a module (and parameter) of the HF model (its layers
    replicated as PEFT will, with ``layer_replication``), with its shape."""
    modules = _hf_modules(hf_model_dir, layer_replication)
    for _, outputs in groups:
        for out in outputs:
            name = out.name.removeprefix(PREFIX)
            module, suffix = _split_key(name)
            if module not in modules:
                raise ConsolidationError(
                    f"{out.name} names no module of the HF model at {hf_model_dir} ({module!r}); PEFT would "
                    "silently ignore it. Is this the model the adapter was trained on?"
                )
            features, params, embedding = modules[module]
            if suffix in LORA_SUFFIXES:
                if features is None:
                    raise ConsolidationError(f"{out.name}: HF module {module} is not a linear or embedding layer.")
                if suffix in (*LoraLayer.factor_keys, *EMBEDDING_FACTOR_KEYS) and embedding != (suffix in EMBEDDING_FACTOR_KEYS):
                    raise ConsolidationError(
                        f"{out.name}: HF module {module} is {'an embedding' if embedding else 'a linear layer'}; PEFT "
                        f"names its factors {EMBEDDING_FACTOR_KEYS if embedding else LoraLayer.factor_keys}."
                    )
                n_in, n_out = features
                want = {
                    "lora_A.weight": (out.shape[0], n_in),
                    "lora_B.weight": (n_out, out.shape[-1]),
                    "lora_embedding_A": (out.shape[0], n_in),
                    "lora_embedding_B": (n_out, out.shape[-1]),
                    "lora_B.bias": (n_out,),
                    "lora_magnitude_vector": (n_out,),
                }[suffix]
            elif suffix in params:
                want = params[suffix]
            else:
                raise ConsolidationError(f"{out.name}: HF module {module} has no parameter {suffix!r}.")
            if tuple(out.shape) != tuple(want):
                raise ConsolidationError(
                    f"{out.name} has shape {list(out.shape)}, but HF module {module} needs {list(want)}."
                )


def _hf_modules(
    hf_model_dir: str, layer_replication: Optional[list] = None
) -> dict[str, tuple[Optional[tuple[int, int]], dict[str, tuple], bool]]:
    """module name -> ((in, out) for linear and embedding layers, {param: shape}, whether it is
    an embedding) of the HF model, built on the meta device from its config.json (no weights
    are read)."""
    import transformers  # heavy optional dependency, needed only with an HF model directory

    try:
        hf_config = transformers.AutoConfig.from_pretrained(hf_model_dir, local_files_only=True)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config)
    except (OSError, ValueError, KeyError) as e:
        raise ConsolidationError(f"cannot build the HF model from {hf_model_dir}/config.json: {e}") from None
    if layer_replication:
        try:
            replicate_layers(model, layer_replication)  # structural only: the meta model stays meta
        except ConfigError as e:
            raise ConsolidationError(f"the HF model at {hf_model_dir} does not fit the checkpoint's {e}") from None
    out = {}
    for name, module in model.named_modules():
        params = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
        if isinstance(module, torch.nn.Linear):
            features = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D" and "weight" in params:  # GPT-2: weight is [in, out]
            features = params["weight"]
        elif isinstance(module, torch.nn.Embedding):  # in = vocabulary, out = embedding_dim
            features = (module.num_embeddings, module.embedding_dim)
        else:
            features = None
        out[name] = (features, params, isinstance(module, torch.nn.Embedding))
    return out


# ---------------------------------------------------------------------------------------------
# Output


def check_out_dir(out_dir: str, overwrite: bool, checkpoint_dir: str) -> None:
    """Refuse an output directory that is, contains or lies inside the checkpoint, is not a
    directory, or (without ``overwrite``) is not empty."""
    if paths_overlap(out_dir, checkpoint_dir):
        raise ConsolidationError(
            f"the output directory {out_dir} must not be, contain or lie inside the checkpoint {checkpoint_dir}."
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConsolidationError(f"{out_dir} exists and is not a directory.")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConsolidationError(f"{out_dir} is not empty; pass --overwrite (overwrite=True) to replace its contents.")


@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool) -> Iterator[str]:
    """A staging directory next to ``out_dir``, renamed to ``out_dir`` on success and removed on
    failure, ``out_dir`` untouched (:class:`dist_lora.io.AtomicDirectory`); an ``out_dir`` that
    became non-empty meanwhile is not replaced without ``overwrite`` (a ConsolidationError)."""
    try:
        with AtomicDirectory(out_dir, overwrite) as staging:
            yield staging
    except DirectoryNotEmptyError as e:
        raise ConsolidationError(str(e)) from None


def write_adapter_file(
    path: str,
    groups: list[tuple[Source, list[Output]]],
    checkpoint_dir: str,
    show_progress: bool,
    fetch: Optional[Callable[[Source], torch.Tensor]] = None,
    allow_nonfinite: bool = False,
) -> None:
    """Stream every group's outputs into one safetensors file. A source's tensor is assembled
    from its shard pieces in ``checkpoint_dir`` (:func:`.pieces.assemble`), or (``fetch``, for
    sources with no pieces, e.g. a DeepSpeed checkpoint's) returned by ``fetch(source)``; one
    with NaN/Inf values is refused unless ``allow_nonfinite``."""
    specs = [(out.name, src.dtype, out.shape) for src, outs in groups for out in outs]
    largest = max(torch.Size(src.global_shape).numel() * src.dtype.itemsize for src, _ in groups)
    tensors, pieces = Scratch(largest if fetch is None else 0), Scratch()
    bar = tqdm(total=len(specs), unit="tensor", desc="consolidating", disable=not show_progress)
    try:
        with ShardFiles(checkpoint_dir) as files, StreamWriter(path, specs, metadata={"format": "pt"}) as writer:
            for source, outputs in groups:
                if fetch is not None:
                    tensor = fetch(source)
                else:
                    with _consolidation_errors():
                        tensor = assemble(source, files, tensors.tensor(source.global_shape, source.dtype), None, pieces)
                if not allow_nonfinite:
                    _check_finite(source.key, tensor, checkpoint_dir)
                for out in outputs:
                    chunks = [tensor] if out.runs is None else [tensor[a:b] for a, b in out.runs]
                    writer.write(out.name, *chunks)
                    bar.update(1)
                del tensor
    finally:
        bar.close()
    _verify_written(path, specs)


def _check_finite(key: str, tensor: torch.Tensor, checkpoint_dir: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        raise ConsolidationError(
            f"{key} in {checkpoint_dir} has {bad} NaN/Inf values (of {tensor.numel()}): the run diverged or the "
            "checkpoint is damaged. Release an earlier checkpoint, or pass --allow-nonfinite (allow_nonfinite=True) "
            "to write it anyway."
        )


def _verify_written(path: str, specs: list) -> None:
    """Re-read the written header with the safetensors library itself."""
    with safe_open(path, framework="pt") as f:
        if f.metadata() != {"format": "pt"} or set(f.keys()) != {name for name, _, _ in specs}:
            raise ConsolidationError(f"{path}: the written file does not read back as written.")  # pragma: no cover
        for name, dtype, shape in specs:
            part = f.get_slice(name)
            if tuple(part.get_shape()) != tuple(shape) or DTYPES[part.get_dtype()] != dtype:
                raise ConsolidationError(  # pragma: no cover
                    f"{path}: {name} reads back as {part.get_dtype()} {part.get_shape()}."
                )
