"""Turn an adapter checkpoint into one PEFT adapter (``dist-lora consolidate``).

One process, no process group. The output is ``adapter_model.safetensors`` +
``adapter_config.json``. Two sources, one pipeline of public stages:

1. read (:mod:`.sources`): a dist_lora sharded checkpoint (:func:`consolidate`, any TP × PP
   layout), an FSDP2 run's DCP checkpoint (:func:`consolidate` too, :mod:`.dcp_source`) or a DeepSpeed ZeRO checkpoint (:func:`consolidate_deepspeed`,
   :mod:`.deepspeed_source`) becomes an :class:`~.sources.AdapterSource`;
2. check (:mod:`.checks`): the init does not rewrite the base weights, every adapted module
   has its factors;
3. map (:mod:`.peft`): output names and adapter_config.json: ``format="peft"`` (default) is
   what ``peft.PeftModel.from_pretrained`` loads onto the Hugging Face model (megatron module
   names mapped to HF ones with :mod:`dist_lora.bridges`; HF names kept); ``format="megatron"``
   keeps global megatron names (TP=1 layout, PEFT's ``base_model.model.`` prefix), which
   dist_lora loads into a megatron model at any TP size (PP=1);
4. check against the HF model (:mod:`.hf_model`, with ``hf_model_dir``): every output key
   names a module of the HF model (built on the meta device) with the right shape;
5. write (:mod:`.write`): streamed, NaN/Inf refused, staged and renamed into place;
6. for a serving engine (``target="vllm"`` / ``"sglang"``, :mod:`.serving`): what the engine
   cannot serve is refused first; the PEFT release is then written to a scratch directory inside
   the staging one and folded (one global scaling, no patterns) into the output.

Checks of a sharded checkpoint (all before anything is written): the manifest follows its
schema with plain file names only and is complete (a missing shard names its PP stage, TP rank
and tensors), checksums match, adapter_config.json's included (the error names the file),
every tensor's pieces cover it exactly, shard headers are valid, the HF config agrees with the
checkpoint (hidden size, layers, attention heads, intermediate size: the error says which). On
any error ``out_dir`` is left as it was.

A PiSSA / OLoRA / CorDA run is released converted to a plain LoRA adapter of rank 2r with the
adapter saved before training (``initial_checkpoint_dir``, :mod:`dist_lora.checkpoint.conversion`).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

from ..checkpoint.dcp_format import is_dcp_checkpoint
from ..checkpoint.conversion import ConversionError, check_convertible, doubled_rank, mutated_to_plain
from ..checkpoint.peft_format import WEIGHTS_NAME, read_adapter_file, write_adapter_dir
from ..config import LoraConfig
from .checks import CONVERSION_HINT, check_factors, check_releasable
from .dcp_source import read_dcp
from .deepspeed_source import read_deepspeed
from .errors import ConsolidationError
from .hf_model import check_against_hf_model
from .peft import check_format, identity_plan, peft_plan
from .serving import Engine, check_servable, engine_for, write_for_engine
from .sources import read_sharded, resolve_checkpoint_dir, sharded_config
from .write import check_out_dir, released_dtype, staged_output, write_release


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
    dtype: Optional[torch.dtype] = None,
    target: str = "peft",
) -> str:
    """Write the sharded adapter checkpoint in ``checkpoint_dir`` as one adapter into
    ``out_dir``; return ``out_dir``. ``checkpoint_dir`` may also be a training run's checkpoint
    root: its ``latest`` checkpoint is used (:func:`~.sources.resolve_checkpoint_dir`).

    ``initial_checkpoint_dir``: for a PiSSA / OLoRA / CorDA run, the sharded checkpoint of the
    adapter saved before training; the output is then the plain LoRA adapter (rank 2r) that
    applies to the ORIGINAL base model. Without it such runs are refused.

    ``hf_model_dir`` (an HF model directory with ``config.json``) gives the attention geometry
    needed to split a fused QKV adapter (required for ``format="peft"`` when there is one), is
    checked against the checkpoint and becomes ``base_model_name_or_path``. A non-empty
    ``out_dir`` is refused unless ``overwrite``. ``verify`` checks the sha256 sums of the shards
    and adapter_config.json. A tensor with NaN/Inf values is refused unless ``allow_nonfinite``.
    ``dtype`` (e.g. ``torch.bfloat16``) is the released dtype of the factors (default: fp32, as
    trained). ``target``: ``"peft"`` (default), or ``"vllm"`` / ``"sglang"`` for an adapter that
    engine serves as trained (:mod:`.serving`; requires ``format="peft"``; the server's minimal
    ``max_lora_rank`` is ``inspect_adapter(out_dir, target).max_lora_rank``). Raises
    :class:`~.errors.ConsolidationError` (a ``ConfigError``/``ValueError``) naming the problem.
    """
    checkpoint_dir, out_dir = resolve_checkpoint_dir(checkpoint_dir), os.fspath(out_dir)
    hf_model_dir = None if hf_model_dir is None else os.fspath(hf_model_dir)
    check_format(format)
    check_out_dir(out_dir, overwrite, checkpoint_dir)
    if is_dcp_checkpoint(checkpoint_dir):
        if format != "peft" or initial_checkpoint_dir is not None:
            raise ConsolidationError(f"{checkpoint_dir} is an FSDP2 (DCP) checkpoint: it is written as a PEFT adapter "
                                     "only (no --format megatron, no --initial).")
        return _consolidate_dcp(checkpoint_dir, out_dir, hf_model_dir, overwrite, show_progress, verify,
                                allow_nonfinite, dtype, target)
    engine = engine_for(target)
    if engine is not None:
        if format != "peft":
            raise ConsolidationError(f"--for {target} writes a PEFT adapter: it needs format 'peft', not {format!r}.")
        check_servable(sharded_config(checkpoint_dir), engine, where=checkpoint_dir)
        return _for_engine(target, out_dir, overwrite, dtype, lambda peft_dir: consolidate(
            checkpoint_dir, peft_dir, hf_model_dir, format, False, show_progress, verify, initial_checkpoint_dir,
            allow_nonfinite, None))
    options = dict(hf_model_dir=hf_model_dir, format=format, show_progress=show_progress, verify=verify,
                   allow_nonfinite=allow_nonfinite, dtype=dtype)
    if initial_checkpoint_dir is not None:
        initial_checkpoint_dir = os.fspath(initial_checkpoint_dir)
        check_out_dir(out_dir, overwrite, initial_checkpoint_dir)
        return _consolidate_converted(checkpoint_dir, initial_checkpoint_dir, out_dir, overwrite, options)
    return _consolidate(checkpoint_dir, out_dir, overwrite=overwrite, **options)


def consolidate_deepspeed(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Optional[str | os.PathLike] = None,
    adapter: str = "default",
    hf_model_dir: Optional[str | os.PathLike] = None,
    tag: Optional[str] = None,
    overwrite: bool = False,
    show_progress: bool = True,
    allow_nonfinite: bool = False,
    dtype: Optional[torch.dtype] = None,
    target: str = "peft",
) -> str:
    """Write adapter ``adapter`` of the DeepSpeed checkpoint in ``checkpoint_dir`` (the
    ``latest`` tag unless ``tag``; its LoraConfig from ``config``, see
    :mod:`.deepspeed_source`) as one PEFT adapter into ``out_dir``, its keys as they are (HF
    module names); return ``out_dir``. ``hf_model_dir`` is checked against the keys and becomes
    ``base_model_name_or_path``. A tensor with NaN/Inf values is refused unless
    ``allow_nonfinite``. ``target`` as for :func:`consolidate`. Raises
    :class:`~.errors.ConsolidationError` (a ``ValueError``)."""
    checkpoint_dir, out_dir = os.fspath(checkpoint_dir), os.fspath(out_dir)
    hf_model_dir = None if hf_model_dir is None else os.fspath(hf_model_dir)
    check_out_dir(out_dir, overwrite, checkpoint_dir)
    engine = engine_for(target)
    if engine is not None:
        return _for_engine(target, out_dir, overwrite, dtype, lambda peft_dir: _consolidate_deepspeed(
            checkpoint_dir, peft_dir, config, adapter, hf_model_dir, tag, False, show_progress, allow_nonfinite, None,
            engine))
    return _consolidate_deepspeed(checkpoint_dir, out_dir, config, adapter, hf_model_dir, tag, overwrite,
                                  show_progress, allow_nonfinite, dtype, None)


def _consolidate_deepspeed(checkpoint_dir: str, out_dir: str, config: Optional[str], adapter: str, hf_model_dir: Optional[str],
                           tag: Optional[str], overwrite: bool, show_progress: bool, allow_nonfinite: bool,
                           dtype: Optional[torch.dtype], engine: Optional[Engine]) -> str:
    """The DeepSpeed release; with ``engine``, what it cannot serve is refused right after reading."""
    source = read_deepspeed(checkpoint_dir, config, adapter, hf_model_dir, tag)
    if engine is not None:
        check_servable(source.config, engine, where=checkpoint_dir)
    return _release_hf_named(source, out_dir, hf_model_dir, overwrite, show_progress, allow_nonfinite, dtype)


def _consolidate_dcp(checkpoint_dir: str, out_dir: str, hf_model_dir: Optional[str], overwrite: bool,
                     show_progress: bool, verify: bool, allow_nonfinite: bool, dtype: Optional[torch.dtype],
                     target: str) -> str:
    """An FSDP2 run's DCP checkpoint (:mod:`.dcp_source`): HF names kept, as for DeepSpeed."""
    engine = engine_for(target)
    if engine is not None:
        check_servable(sharded_config(checkpoint_dir), engine, where=checkpoint_dir)
        return _for_engine(target, out_dir, overwrite, dtype, lambda peft_dir: _consolidate_dcp(
            checkpoint_dir, peft_dir, hf_model_dir, False, show_progress, verify, allow_nonfinite, None, "peft"))
    source = read_dcp(checkpoint_dir, verify, hf_model_dir)
    return _release_hf_named(source, out_dir, hf_model_dir, overwrite, show_progress, allow_nonfinite, dtype)


def _consolidate(
    checkpoint_dir: str,
    out_dir: str,
    hf_model_dir: Optional[str],
    format: str,
    overwrite: bool,
    show_progress: bool,
    verify: bool,
    allow_nonfinite: bool,
    dtype: Optional[torch.dtype] = None,
    allow_base_changing: bool = False,
) -> str:
    source = read_sharded(checkpoint_dir, verify)
    if not allow_base_changing:
        check_releasable(source.config, CONVERSION_HINT)
    check_factors(source.tensors, source.config)
    plan = peft_plan(source.tensors, source.config, hf_model_dir, format)
    if format == "peft" and hf_model_dir is not None:
        check_against_hf_model(plan.groups, hf_model_dir, source.config.layer_replication)
    return write_release(source, plan, out_dir, overwrite, show_progress, allow_nonfinite, dtype)


def _for_engine(target: str, out_dir: str, overwrite: bool, dtype: Optional[torch.dtype], write_peft) -> str:
    """``write_peft(dir)`` (the fp32 PEFT release) into a scratch directory of the staging one,
    then the engine's folded release into the staging one; ``out_dir`` changes only at the end."""
    with staged_output(out_dir, overwrite) as staging:
        with tempfile.TemporaryDirectory(dir=staging) as work:
            peft_dir = os.path.join(work, "peft")
            write_peft(peft_dir)
            write_for_engine(peft_dir, staging, engine_for(target), dtype)
    return out_dir


# ---------------------------------------------------------------------------------------------
# PiSSA / OLoRA / CorDA: released converted to plain LoRA


def _consolidate_converted(checkpoint_dir: str, initial_dir: str, out_dir: str, overwrite: bool, options: dict) -> str:
    """Consolidate the trained and the initial checkpoint, then convert (adapter-sized work)."""
    run_config = sharded_config(checkpoint_dir)
    try:
        check_convertible(run_config)
    except ConversionError as e:
        raise ConsolidationError(f"{checkpoint_dir}: {e}") from None
    with staged_output(out_dir, overwrite) as staging:
        with tempfile.TemporaryDirectory(dir=staging) as work:
            trained, initial = os.path.join(work, "trained"), os.path.join(work, "initial")
            exact = {**options, "dtype": None}  # converted in fp32, cast once at the end
            _consolidate(checkpoint_dir, trained, overwrite=False, allow_base_changing=True, **exact)
            _consolidate(initial_dir, initial, overwrite=False, allow_base_changing=True, **exact)
            try:
                convert_adapter_dir(trained, initial, staging, run_config=run_config, dtype=options["dtype"])
            except ConversionError as e:
                raise ConsolidationError(f"{checkpoint_dir} with initial checkpoint {initial_dir}: {e}") from None
    return out_dir


def convert_adapter_dir(
    trained_dir: str | os.PathLike,
    initial_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    run_config: Optional[LoraConfig] = None,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Convert the PEFT adapter in ``trained_dir`` using the same adapter as saved before
    training (``initial_dir``) and write the plain-LoRA adapter into ``out_dir``.

    ``run_config`` is the config the run was trained with (default: ``initial_dir``'s); it
    must be a convertible init. The written config is ``trained_dir``'s with r and alpha
    doubled (:func:`~dist_lora.checkpoint.conversion.doubled_rank`)."""
    trained_config = LoraConfig.from_pretrained(trained_dir)
    initial_config = LoraConfig.from_pretrained(initial_dir)
    check_convertible(run_config or initial_config)
    if (trained_config.r, trained_config.lora_alpha, trained_config.rank_pattern) != (
        initial_config.r, initial_config.lora_alpha, initial_config.rank_pattern
    ):
        raise ConversionError(
            f"{trained_dir} and {initial_dir} have different r / lora_alpha / rank_pattern: not the same run."
        )
    trained = read_adapter_file(os.path.join(trained_dir, WEIGHTS_NAME))
    initial = read_adapter_file(os.path.join(initial_dir, WEIGHTS_NAME))
    tensors = {k: v.to(released_dtype(v.dtype, dtype)).contiguous() for k, v in mutated_to_plain(trained, initial).items()}
    write_adapter_dir(out_dir, tensors, doubled_rank(trained_config))
    return os.fspath(out_dir)


def _release_hf_named(source, out_dir: str, hf_model_dir: Optional[str], overwrite: bool, show_progress: bool,
                      allow_nonfinite: bool, dtype: Optional[torch.dtype]) -> str:
    """Check and write a source whose tensors already have HF names (DeepSpeed, DCP)."""
    check_releasable(source.config)
    check_factors(source.tensors, source.config)
    plan = identity_plan(source.tensors, source.config, hf_model_dir, rename=True)
    if hf_model_dir is not None:
        check_against_hf_model(plan.groups, hf_model_dir, source.config.layer_replication)
    return write_release(source, plan, out_dir, overwrite, show_progress, allow_nonfinite, dtype)
