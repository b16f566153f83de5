"""In-memory adapter export for RL weight sync: the released adapter as ``{name: tensor}``.

RL frameworks hand the current adapter to the rollout engine after each step, in memory (like
verl's ``TensorLoRARequest``). :func:`adapter_tensors` gathers the adapter of a TP × PP (× DP)
sharded model and returns on rank ``dst`` exactly the tensors that ``dist-lora consolidate
--for ENGINE`` writes after :func:`~dist_lora.checkpoint.sharded.save_sharded` of the same
model (bit for bit); :func:`adapter_config` returns the adapter_config.json it writes. The
release pipeline is reused stage by stage, nothing is re-implemented: the same ranks own the
same pieces as in ``save_sharded`` (:func:`~dist_lora.checkpoint.sharded.owned_parameters`),
the same checks and PEFT plan (:mod:`dist_lora.release.peft`: megatron -> HF names, fused
q/k/v and gate/up split) and the same engine fold (:func:`dist_lora.release.serving.for_engine`).

Collective: **every rank of the default process group must call it with the same
arguments.** It runs two collectives: an ``all_gather_object`` of each rank's call signature and
tensor shapes (a few hundred bytes per tensor: the calls are checked to agree, and every rank
builds the same plan, so a refused adapter raises on every rank), then one ``send`` / ``recv``
per adapter piece to ``dst`` (into the preallocated global tensor, no pickling): only adapter
tensors move, never base weights. Peak extra memory on ``dst``: about two copies of the
released adapter (the gathered tensors, and the folded ones), one piece on the other ranks.
Before the collectives, a handshake through the process group's store
(:func:`~dist_lora.parallel.handshake.all_arrive`: a few small store requests, no collective;
about 3 ms at 2 CPU ranks, ``bench/export_bench.py``):
a call on only some ranks fails within ``timeout`` seconds (default 60) on every calling rank,
with a ConfigError naming the ranks that did not call it, instead of waiting for the process
group's timeout. Bad arguments (naming, engine, adapter name, an adapter the engine cannot
serve, timeout) are refused before any collective, on the rank that has them with their own
message and on the other calling ranks with a ConfigError quoting it. Nothing is registered on
the model: a training step that does not call it is unchanged.

``naming``: ``"peft"`` keys as in ``adapter_model.safetensors``
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``); ``"vllm"`` the same keys
without PEFT's ``base_model.model.`` prefix (HF module names, as vLLM's
``parse_fine_tuned_lora_name`` reduces them). ``for_engine``: ``"vllm"`` / ``"sglang"`` (the
folded release, :mod:`dist_lora.release.serving`), ``"peft"`` (``consolidate --for peft``);
default ``"vllm"`` for ``naming="vllm"``, else ``"peft"``.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
import torch.distributed as dist

from .checkpoint.peft_format import PREFIX
from .checkpoint.pieces import tp_boxes
from .checkpoint.sharded import owned_parameters, parallel_ranks, param_tp_rank_size
from .config import ConfigError, LoraConfig
from .parallel.handshake import all_arrive
from .release.checks import CONVERSION_HINT, check_factors, check_releasable
from .release.hf_model import check_against_hf_model
from .release.peft import peft_plan
from .release.serving import check_servable, engine_config, engine_for, for_engine as fold_for_engine
from .release.serving import max_lora_rank, module_ranks
from .release.sources import AdapterSource, Read, Source
from .release.write import Plan, check_finite, output_chunks, read_group_source, released_dtype

if TYPE_CHECKING:
    from .model import LoraModel

NAMINGS = ("peft", "vllm")
WHERE = "the in-memory adapter"
HANDSHAKE = "dist_lora.export"  # one call count for adapter_tensors and adapter_config
TIMEOUT_S = 60.0


def adapter_tensors(
    model: "LoraModel",
    naming: str = "peft",
    dtype: Optional[torch.dtype] = None,
    for_engine: Optional[str] = None,
    dst: int = 0,
    hf_model_dir: Optional[str] = None,
    adapter: Optional[str] = None,
    allow_nonfinite: bool = False,
    timeout: float = TIMEOUT_S,
) -> Optional[dict[str, torch.Tensor]]:
    """On rank ``dst``: the released adapter's tensors (CPU, contiguous) named by ``naming``,
    folded for ``for_engine``, cast to ``dtype`` (floating-point tensors, when given); None on
    the other ranks. A collective: every rank must call it with the same arguments (module
    docstring). ``hf_model_dir`` as for :func:`~dist_lora.release.consolidate.consolidate`: the
    attention geometry to split a fused QKV adapter, checked against the model, and the
    config's ``base_model_name_or_path``. A NaN/Inf tensor is refused unless ``allow_nonfinite``.
    ``timeout``: seconds to wait for the other ranks to call it too (they may arrive that much
    later than the first); past it every calling rank raises, naming the ranks that did not.
    Raises :class:`~dist_lora.config.ConfigError` (a ``ValueError``) naming the problem."""
    target, config, adapter = _arrive(model, naming, for_engine, adapter, dst, timeout)
    ranks = parallel_ranks()
    owned = owned_parameters(model, adapter, ranks)
    signature = (naming, target, str(dtype), dst, adapter, hf_model_dir, allow_nonfinite)
    layouts = _gather_layout(owned, ranks, signature)
    plan = _plan(config, _shapes(layouts), hf_model_dir)
    gathered = _gather_tensors(owned, ranks, layouts, dst)
    if gathered is None:
        return None
    source = MemorySource(config, {src.key: src for src, _ in plan.groups}, WHERE, gathered)
    engine = engine_for(target)
    tensors = _plan_tensors(plan, source, None if engine else dtype, allow_nonfinite)
    if engine is not None:
        tensors = fold_for_engine(tensors, plan.config, engine, dtype, where=WHERE)[0]
    return {_name(key, naming): value for key, value in tensors.items()}


def adapter_config(
    model: "LoraModel",
    for_engine: str = "vllm",
    hf_model_dir: Optional[str] = None,
    adapter: Optional[str] = None,
    timeout: float = TIMEOUT_S,
) -> dict[str, Any]:
    """The adapter_config.json (as a dict) that ``dist-lora consolidate --for for_engine`` writes
    for this model, on every rank. A collective like :func:`adapter_tensors` (one small
    ``all_gather_object`` of tensor shapes, no tensor data; the same handshake and ``timeout``)."""
    target, config, adapter = _arrive(model, "peft", for_engine, adapter, 0, timeout)
    ranks = parallel_ranks()
    signature = ("config", target, adapter, hf_model_dir)
    plan = _plan(config, _shapes(_gather_layout(owned_parameters(model, adapter, ranks), ranks, signature)), hf_model_dir)
    released = plan.config
    engine = engine_for(target)
    if engine is not None:
        ranks_of = module_ranks({out.name: torch.empty(out.shape, device="meta") for _, outs in plan.groups for out in outs})
        check_servable(released, engine, list(ranks_of), where=WHERE)
        max_lora_rank(released, ranks_of, engine)
        released = engine_config(released, ranks_of)
    return json.loads(json.dumps(released.to_dict(), sort_keys=True))


# ---------------------------------------------------------------------------------------------
# Before any collective: the arguments, and every rank's arrival


def _arrive(
    model: "LoraModel", naming: str, for_engine: Optional[str], adapter: Optional[str], dst: int, timeout: float
):
    """:func:`_check_call`'s result once every rank has called (the handshake); else a
    ConfigError on every calling rank: this rank's own if its arguments are refused."""
    try:
        checked = _check_call(model, naming, for_engine, adapter, dst, timeout)
    except ConfigError as error:
        all_arrive(HANDSHAKE, timeout, refusal=str(error))
        raise
    all_arrive(HANDSHAKE, timeout)
    return checked


def _check_call(
    model: "LoraModel", naming: str, for_engine: Optional[str], adapter: Optional[str], dst: int, timeout: float
):
    """(release target, the adapter's config, adapter name), or a ConfigError."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    if naming not in NAMINGS:
        raise ConfigError(f"naming must be one of {NAMINGS}, got {naming!r}.")
    target = for_engine if for_engine is not None else ("vllm" if naming == "vllm" else "peft")
    engine = engine_for(target)  # an unknown target: ConsolidationError (a ConfigError)
    adapter = adapter or model.active_adapters[0]
    if adapter not in model.peft_config:
        raise ConfigError(f"adapter {adapter!r} is not in the model (it has {sorted(model.peft_config)}).")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not isinstance(dst, int) or not 0 <= dst < world:
        raise ConfigError(f"dst must be a rank in [0, {world}), got {dst!r}.")
    config = model.peft_config[adapter]
    if engine is not None:
        check_servable(config, engine, where=WHERE)
    return target, config, adapter


# ---------------------------------------------------------------------------------------------
# The collectives


Layout = list[tuple[str, tuple[int, ...], str, list[int], list[int]]]  # (key, global shape, dtype, offsets, shape)


def _local_pieces(owned: list, ranks: dict) -> Iterator[tuple[tuple, torch.Tensor]]:
    """This rank's pieces (:func:`~dist_lora.checkpoint.pieces.tp_boxes`, as ``save_sharded``
    writes them): (layout entry, the piece as a view of the parameter)."""
    for key, param in owned:
        global_shape, boxes = tp_boxes(param, *param_tp_rank_size(param, ranks))
        dtype = str(param.dtype).removeprefix("torch.")
        for index, offsets, shape in boxes:
            yield (key, tuple(global_shape), dtype, list(offsets), list(shape)), param.detach()[index]


def _gather_layout(owned: list, ranks: dict, signature: tuple) -> list[Layout]:
    """Every rank's pieces (no data), after checking that every rank's call ``signature`` agrees
    (a ConfigError on every rank naming the ranks that differ)."""
    local = [entry for entry, _ in _local_pieces(owned, ranks)]
    records = [(signature, local)]
    if dist.is_initialized():
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, (signature, local))
    differing = [rank for rank, (theirs, _) in enumerate(records) if theirs != signature]
    if differing:
        raise ConfigError(
            f"adapter export was called with different arguments on ranks {differing} than on this rank "
            f"({signature}): every rank must call it with the same arguments."
        )
    return [layout for _, layout in records]


def _shapes(layouts: list[Layout]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {key: (shape, getattr(torch, dtype)) for layout in layouts for key, shape, dtype, _, _ in layout}


def _gather_tensors(owned: list, ranks: dict, layouts: list[Layout], dst: int) -> Optional[dict[str, torch.Tensor]]:
    """On ``dst``: every global adapter tensor (CPU), each piece received straight from the rank
    that owns it (one send / recv per piece, no pickling); None elsewhere."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != dst:
        for _, piece in _local_pieces(owned, ranks):
            dist.send(piece.contiguous(), dst=dst)
        return None
    tensors = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in _shapes(layouts).items()}
    local = _local_pieces(owned, ranks)
    device = torch.device("cuda", torch.cuda.current_device()) if _backend() == "nccl" else torch.device("cpu")
    for src, layout in enumerate(layouts):
        for key, _, _, offsets, shape in layout:
            if src == rank:
                piece = next(local)[1]
            else:
                piece = torch.empty(shape, dtype=tensors[key].dtype, device=device)
                dist.recv(piece, src=src)
            tensors[key][tuple(slice(o, o + n) for o, n in zip(offsets, shape))] = piece
    return tensors


def _backend() -> Optional[str]:
    return dist.get_backend() if dist.is_initialized() else None


# ---------------------------------------------------------------------------------------------
# On dst: the file release's stages on memory


class MemorySource(AdapterSource):
    """An :class:`~dist_lora.release.sources.AdapterSource` of gathered global tensors (each
    handed out once and then dropped, so the peak stays near one copy of the adapter)."""

    def __init__(self, config: LoraConfig, sources: dict[str, Source], where: str, tensors: dict) -> None:
        super().__init__(config, sources, where)
        self._tensors = tensors

    @contextlib.contextmanager
    def reading(self) -> Iterator[Read]:
        yield lambda source: self._tensors.pop(source.key)


def _plan(config: LoraConfig, shapes: dict, hf_model_dir: Optional[str]) -> Plan:
    """The file release's checks and PEFT plan for tensors of ``shapes`` (on every rank)."""
    sources = {key: Source(key, shape, dtype, []) for key, (shape, dtype) in sorted(shapes.items())}
    check_releasable(config, CONVERSION_HINT)
    check_factors(sources, config)
    plan = peft_plan(sources, config, hf_model_dir, "peft")
    if hf_model_dir is not None:
        check_against_hf_model(plan.groups, hf_model_dir, config.layer_replication)
    return plan


def _plan_tensors(plan: Plan, source: MemorySource, dtype: Optional[torch.dtype], allow_nonfinite: bool) -> dict:
    """The plan's output tensors, as :func:`~dist_lora.release.write.write_adapter_file` writes them."""
    out = {}
    with source.reading() as read:
        for src, outputs in plan.groups:
            tensor = read_group_source(read, src).to(released_dtype(src.dtype, dtype))
            if not allow_nonfinite:
                check_finite(src.key, tensor, source.where)
            for output in outputs:
                alone = output.runs is None and len(outputs) == 1  # the gathered tensor itself, no copy
                out[output.name] = tensor if alone else torch.cat(output_chunks(tensor, output))
    return out


def _name(key: str, naming: str) -> str:
    return key.removeprefix(PREFIX) if naming == "vllm" else key
