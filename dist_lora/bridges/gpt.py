"""A megatron-core GPTModel (local spec) built from a Hugging Face checkpoint of a supported family.

The config goes through :mod:`.hf_config`; every parameter is then filled from the HF tensors
its family-table entry (:mod:`.families`) names, in the entry's TP split and fused layout
(:mod:`.layouts`, one implementation, used both here and by the consolidation of fused LoRA
factors). Each rank reads only its slices of the tensors of its own pipeline stage
(:class:`~dist_lora.bridges.checkpoint_reader.CheckpointReader`).

Mixture-of-experts layers: each expert-parallel rank reads only its own experts (by GLOBAL
expert index, :func:`dist_lora.naming.global_expert_index`), and of each only its expert-TP slice,
from either on-disk layout: per-expert tensors (``...experts.e.w1.weight``, what
transformers 5.24's ``save_pretrained`` writes and the Hub holds) or transformers 5's fused
3-D tensors (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]), sliced on
disk as [e, rows, columns].
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from ..naming import global_module_name
from .checkpoint_reader import CheckpointReader
from .families import DEFAULT_MODULES
from .hf_config import (
    UnsupportedCheckpointError,
    check_parallel_layout,
    gpt_model_kwargs_from_hf,
    parse_hf_config,
    read_hf_config,
    transformer_config_from_hf,
)
from .layouts import Attention, contiguous_shard, fused_shard_ranges, merge_fused
from .table import (
    Mapped,
    ModelFamily,
    Module,
    ModuleTable,
)

if TYPE_CHECKING:  # megatron is imported lazily: names and layouts work without it
    from megatron.core.models.gpt import GPTModel


def build_megatron_gpt(
    hf_dir: str | os.PathLike[str],
    tp: int = 1,
    pp: int = 1,
    sequence_parallel: bool = False,
    attention: str = "megatron",
    ep: int = 1,
    etp: Optional[int] = None,
    **overrides: Any,
) -> "GPTModel":
    """This rank's megatron GPTModel (local spec, RoPE) with the HF checkpoint's weights.

    ``ep`` / ``etp``: expert-parallel and expert-tensor-parallel sizes of a mixture-of-experts
    model (etp None: the size megatron's parallel state was initialised with). On CPU ranks
    with ETP > 1 the token dispatcher is megatron's all-gather one (gloo cannot run the
    all-to-all dispatcher's differently sized expert-TP all-gathers); else all-to-all.

    ``attention``: ``"megatron"`` (megatron's local core attention) or ``"sdpa"``
    (:class:`~dist_lora.bridges.attention.SDPAttention`: torch's scaled_dot_product_attention).

    megatron's parallel state must be initialised with TP=tp, PP=pp, EP=ep (no virtual pipeline).
    The config and parallel layout are validated, and the checkpoint files located, before
    any process-group work. Embedding on the first PP stage, final norm and output layer on
    the last; each rank reads only its own slices of its own stage's tensors.
    ``overrides`` go to :func:`transformer_config_from_hf`.
    """
    from megatron.core import parallel_state  # megatron (heavy) is imported on use
    from megatron.core.models.gpt import GPTModel

    from .block_spec import gpt_local_block_spec  # imports megatron

    if attention not in ("megatron", "sdpa"):
        raise ValueError(f"attention must be 'megatron' or 'sdpa', got {attention!r}.")

    hf_config = read_hf_config(hf_dir)
    check_parallel_layout(parse_hf_config(hf_config), tp, pp, ep, etp, sequence_parallel)  # before any groups
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron's parallel state is not initialised (parallel_state.initialize_model_parallel).")
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
        parallel_state.get_expert_tensor_parallel_world_size(),
    )
    if actual[:3] != (tp, pp, ep) or etp not in (None, actual[3]):
        raise ValueError(
            f"build_megatron_gpt(tp={tp}, pp={pp}, ep={ep}, etp={etp}) but megatron is initialised with "
            f"TP={actual[0]}, PP={actual[1]}, EP={actual[2]}, ETP={actual[3]}."
        )
    etp = actual[3]
    if etp > 1 and not torch.cuda.is_available():
        overrides.setdefault("moe_token_dispatcher_type", "allgather")
    config = transformer_config_from_hf(hf_config, tp, pp, sequence_parallel, ep, etp, **overrides)
    model_kwargs = gpt_model_kwargs_from_hf(hf_config)
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
        raise UnsupportedCheckpointError("virtual pipeline stages are not supported by build_megatron_gpt.")
    with CheckpointReader(hf_dir) as reader:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        with _cpu_tensor_cuda_noop(enabled=pp > 1 and model_kwargs["share_embeddings_and_output_weights"]):
            model = GPTModel(
                config=config,
                transformer_layer_spec=gpt_local_block_spec(config, pp_rank=pp_rank, attention=attention),
                pre_process=parallel_state.is_pipeline_first_stage(),
                post_process=parallel_state.is_pipeline_last_stage(),
                **model_kwargs,
            )
        load_hf_weights(model, reader, parse_hf_config(hf_config).family)
    return model


@contextlib.contextmanager
def _cpu_tensor_cuda_noop(enabled: bool) -> Iterator[None]:
    """With tied embeddings and PP > 1, GPTModel's constructor all-reduces the output-layer copy
    of the embedding after ``weight.data.cuda()``, which raises on a CPU-only torch. Make
    ``Tensor.cuda`` return the tensor for the duration (CPU only; the loaded weights overwrite
    whatever the all-reduce produced)."""
    if not enabled or torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def load_hf_weights(
    model: torch.nn.Module,
    checkpoint: CheckpointReader | str | os.PathLike[str],
    family: Optional[ModelFamily] = None,
) -> int:
    """Copy this rank's slices of an HF checkpoint into a bare megatron GPTModel built for it
    (every parameter must be mapped by the ``family`` table, default: the Llama family's; call
    before wrapping it with LoRA). Also sets megatron's tensor-parallel markers
    (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``), which megatron skips
    when ``perform_initialization=False``. Returns the bytes read."""
    from megatron.core import parallel_state  # megatron (heavy) is imported on use
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if not isinstance(checkpoint, CheckpointReader):
        with CheckpointReader(checkpoint) as reader:
            return load_hf_weights(model, reader, family)
    reader, modules = checkpoint, (family.modules if family is not None else DEFAULT_MODULES)
    start = reader.bytes_read
    config = model.config
    attention = Attention(config.num_attention_heads, config.num_query_groups, config.kv_channels)
    dense_tp = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size())
    expert_tp = (parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size())
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    for name, param in model.named_parameters():
        mapped = _param_source(model, name, modules)
        hf_names = mapped.entry.tied if tied and mapped.entry.tied else mapped.hf
        suffix = name.rsplit(".", 1)[1]
        rank, size = expert_tp if mapped.entry.per_expert else dense_tp
        if mapped.entry.v5 and f"{hf_names[0]}.{suffix}" not in reader:
            tensor = _read_v5(reader, mapped, suffix, rank, size)
        else:
            sources = [f"{hf}.{suffix}" for hf in hf_names]
            tensor = _read_shard(reader, mapped.entry, sources, attention, rank, size)
        if tensor.shape != param.shape:
            raise ValueError(
                f"{name} ({mapped.megatron}): checkpoint gives shape {tuple(tensor.shape)} from {hf_names}, "
                f"the model has {tuple(param.shape)} (config.json does not match the weights?)."
            )
        with torch.no_grad():
            param.copy_(tensor)
        if mapped.entry.partition is not None and not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, True, *mapped.entry.partition)
    return reader.bytes_read - start


def _read_shard(
    reader: CheckpointReader, entry: Module, sources: list[str], attention: Optional[Attention], rank: int, size: int
) -> torch.Tensor:
    """TP rank ``rank``'s part of one parameter, read from its HF tensors ``sources`` in the
    entry's TP split and fused layout."""
    if entry.tp == "replicated":
        return reader.read(sources[0])
    if entry.tp == "row":
        return reader.read(sources[0], slice(None), contiguous_shard(reader.shape(sources[0])[1], rank, size))
    ranges = fused_shard_ranges(entry.fused, [reader.shape(src)[0] for src in sources], attention, rank, size)
    parts = [reader.read(src, rows) for src, rows in zip(sources, ranges)]
    return merge_fused(entry.fused, parts, attention.shard(size) if attention is not None else None)


def _read_v5(reader: CheckpointReader, mapped: Mapped, suffix: str, rank: int, size: int) -> torch.Tensor:
    """TP rank ``rank``'s part of a parameter from transformers 5's tensor ``mapped.v5``: for an
    expert-indexed entry the 3-D tensor of all experts ([E, rows of all parts, in], the parts
    concatenated along dim 1 in the entry's HF order), read as [expert, rows, columns]; else
    the module's 2-D weight under its transformers 5 name."""
    entry, source = mapped.entry, mapped.v5 if mapped.expert is not None else f"{mapped.v5}.{suffix}"
    if source not in reader:
        raise KeyError(
            f"{mapped.megatron}.{suffix}: the checkpoint at {reader.directory} has neither "
            f"{[f'{hf}.{suffix}' for hf in mapped.hf]} (per-expert layout) nor {source!r} (transformers 5 layout)."
        )
    if mapped.expert is None:
        return _read_shard(reader, entry, [source], None, rank, size)
    if suffix != "weight":
        raise KeyError(f"{mapped.megatron}.{suffix}: transformers 5's {source} holds expert weights only.")
    shape = reader.shape(source)
    if len(shape) != 3 or mapped.expert >= shape[0]:
        raise ValueError(
            f"{source} has shape {shape}; expected [experts, rows, columns] with expert {mapped.expert} in it "
            "(config.json does not match the weights?)."
        )
    experts = slice(mapped.expert, mapped.expert + 1)
    if entry.tp == "row":
        return reader.read(source, experts, slice(None), contiguous_shard(shape[2], rank, size))[0]
    if entry.tp == "replicated":
        return reader.read(source, experts)[0]
    rows = shape[1] // len(entry.hf)
    ranges = fused_shard_ranges(entry.fused, [rows] * len(entry.hf), None, rank, size)
    parts = [reader.read(source, experts, slice(p * rows + r.start, p * rows + r.stop))[0] for p, r in enumerate(ranges)]
    return merge_fused(entry.fused, parts)


def _param_source(model: torch.nn.Module, param_name: str, modules: ModuleTable) -> Mapped:
    """The table entry and HF names of a local parameter name (its PP-local layer index and
    EP-local expert index made global)."""
    module_name = global_module_name(model, param_name.rsplit(".", 1)[0])
    try:
        return modules.megatron(module_name)
    except KeyError as err:
        raise KeyError(
            f"parameter {param_name!r} has no HF source (load_hf_weights takes a bare GPTModel built by "
            f"this bridge): {err}"
        ) from None
