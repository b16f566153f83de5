"""The ``dist-lora`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from typing import Callable

import torch

from .bridges import UnsupportedCheckpointError
from .checkpoint.deepspeed_reader import is_deepspeed_checkpoint
from .checkpoint.sharded import MANIFEST
from .config import DistLoraWarning
from .demo import run_demo
from .release.consolidate import consolidate, consolidate_deepspeed
from .release.inspect import inspect_adapter
from .release.merged import merge_export
from .release.serving import TARGETS
from .release.sources import is_training_root, resolve_checkpoint_dir
from .train import train
from .train_config import describe_keys, load_train_config
from .train_fsdp2 import train_fsdp2


BAD_INPUT = 2  # exit code for bad input: a bad argument (as argparse), a bad config or file


def _error(command: str, message: str, code: int = BAD_INPUT) -> int:
    print(f"dist-lora {command}: error: {message}", file=sys.stderr)
    return code


def _release(command: str, write: Callable[[], str]) -> int:
    """Run ``write`` (returns the output directory); bad input is one error line, no traceback,
    and each DistLoraWarning (e.g. an old checkpoint format) one warning line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DistLoraWarning)
        try:
            out = write()
        except (ValueError, OSError) as e:  # ConfigError (and every reader's error) is a ValueError
            out, error = None, str(e)
    for warning in caught:
        if issubclass(warning.category, DistLoraWarning):
            print(f"dist-lora {command}: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if out is None:
        return _error(command, error)
    print(f"wrote {out}")
    return 0


RELEASE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _consolidate(args: argparse.Namespace, rest: list[str]) -> int:
    """Join a sharded (or DeepSpeed) adapter checkpoint into one PEFT (or megatron-named) adapter."""
    if rest:
        return _error("consolidate", f"unrecognized arguments: {' '.join(rest)}")
    deepspeed = args.deepspeed or (
        not os.path.isfile(os.path.join(args.checkpoint, MANIFEST))
        and not is_training_root(args.checkpoint)
        and is_deepspeed_checkpoint(args.checkpoint)
    )
    if not deepspeed and (args.config or args.tag or args.adapter != "default"):
        return _error("consolidate", "--config/--tag/--adapter apply to DeepSpeed checkpoints only")
    if deepspeed and (args.format != "peft" or args.initial):
        message = "a DeepSpeed checkpoint is written as a PEFT adapter only (no --format megatron, no --initial)"
        return _error("consolidate", message)
    options = dict(hf_model_dir=args.hf_model, overwrite=args.overwrite, show_progress=not args.no_progress,
                   allow_nonfinite=args.allow_nonfinite, dtype=RELEASE_DTYPES[args.dtype], target=args.target)
    if deepspeed:
        code = _release("consolidate", lambda: consolidate_deepspeed(
            args.checkpoint, args.out_dir, config=args.config, adapter=args.adapter, tag=args.tag, **options
        ))
    else:
        code = _release("consolidate", lambda: consolidate(
            _resolved(args.checkpoint), args.out_dir, format=args.format, initial_checkpoint_dir=args.initial, **options
        ))
    if code == 0 and args.target != "peft":
        report = inspect_adapter(args.out_dir, args.target)
        print(f"{report.engine}: set max_lora_rank >= {report.max_lora_rank}")
    return code


def _inspect(args: argparse.Namespace, rest: list[str]) -> int:
    """Print what a PEFT adapter holds and whether the engine (--for) serves it as trained."""
    if rest:
        return _error("inspect", f"unrecognized arguments: {' '.join(rest)}")
    try:
        report = inspect_adapter(args.adapter_dir, args.target)
    except (ValueError, OSError) as e:
        return _error("inspect", str(e))
    print("\n".join(report.lines()))
    return 0


def _resolved(checkpoint: str) -> str:
    """The checkpoint to read; for a training run's root its latest one, said on stderr."""
    found = resolve_checkpoint_dir(checkpoint)
    if found != checkpoint:
        print(f"{checkpoint} is a training run's checkpoint root: using its latest checkpoint {found}", file=sys.stderr)
    return found


def _merge(args: argparse.Namespace, rest: list[str]) -> int:
    """Merge a sharded adapter checkpoint into its HF base model and write an HF checkpoint."""
    if rest:
        return _error("merge", f"unrecognized arguments: {' '.join(rest)}")
    return _release("merge", lambda: merge_export(
        _resolved(args.checkpoint), args.hf_model, args.out_dir, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, show_progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite,
    ))


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    """One rank of a training job (run it under torchrun)."""
    bad = [r for r in rest if "=" not in r]
    if bad:
        return _error("train", f"unrecognized arguments: {' '.join(bad)}")
    try:
        config = load_train_config(args.config, tuple(rest))
        (train_fsdp2 if config.parallel.backend == "fsdp2" else train)(config, resume=args.resume)
    except (ValueError, OSError, UnsupportedCheckpointError) as e:  # bad input: a message on every rank
        return _error("train", str(e))
    return 0


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    return run_demo(args.out, nproc=args.nproc, overrides=rest)


_NONFINITE_HELP = "write adapter tensors with NaN/Inf values too (refused by default: the run diverged)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-lora",
        description="PEFT-compatible LoRA for megatron-core tensor/sequence-parallel models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    consolidate = commands.add_parser(
        "consolidate",
        help="join a sharded adapter checkpoint into one PEFT adapter",
        description="Write adapter_model.safetensors + adapter_config.json that peft.PeftModel.from_pretrained "
        "loads onto the Hugging Face model (megatron names mapped, fused QKV / fc1 split), or with "
        "--format megatron one file under the global megatron names. One process, streaming.",
    )
    consolidate.add_argument(
        "checkpoint", metavar="CHECKPOINT",
        help="sharded checkpoint directory (with manifest.json), a training run's checkpoint root (its latest "
        "checkpoint is used), or a DeepSpeed checkpoint",
    )
    consolidate.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must be empty or absent unless --overwrite)")
    consolidate.add_argument("--hf-model", metavar="HF_DIR", help="HF model directory (config.json); needed to split fused QKV")
    consolidate.add_argument("--format", choices=("peft", "megatron"), default="peft", help="default: peft")
    consolidate.add_argument(
        "--initial", metavar="INITIAL_CHECKPOINT",
        help="PiSSA/OLoRA/CorDA runs: the sharded checkpoint saved before training (dist-lora train writes "
        "OUT/initial_adapter); the output is then a plain LoRA adapter of rank 2r for the original base model",
    )
    consolidate.add_argument(
        "--for", dest="target", choices=TARGETS, default="peft",
        help="peft (default), or a serving engine: each module's scaling folded into B, no rank/alpha patterns, "
        "what the engine cannot serve refused; prints the server's minimal max_lora_rank",
    )
    consolidate.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    consolidate.add_argument("--no-progress", action="store_true", help="no progress bar")
    consolidate.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)
    consolidate.add_argument("--dtype", choices=tuple(RELEASE_DTYPES), default="fp32",
                             help="dtype of the released factors (default fp32, as trained; bf16/fp16 halve the file)")
    deepspeed = consolidate.add_argument_group(
        "DeepSpeed checkpoints",
        "CHECKPOINT may be the directory given to engine.save_checkpoint (with 'latest'), or a tag directory with "
        "*_model_states.pt / zero_pp_rank_*_optim_states.pt (ZeRO 1-3, adapter-only training); it is detected "
        "by its layout. Its LoRA config is read from adapter_config.json in CHECKPOINT or the tag directory "
        "unless --config is given.",
    )
    deepspeed.add_argument("--deepspeed", action="store_true", help="treat CHECKPOINT as a DeepSpeed checkpoint")
    deepspeed.add_argument("--config", metavar="DIR", help="directory (or file) with the run's adapter_config.json")
    deepspeed.add_argument("--tag", help="checkpoint tag (default: the one in CHECKPOINT/latest)")
    deepspeed.add_argument("--adapter", default="default", help="adapter name in the checkpoint (default: default)")
    merge = commands.add_parser(
        "merge",
        help="merge a sharded adapter checkpoint into its HF base model (HF safetensors checkpoint)",
        description="Write the HF base model with the adapter merged (W + s·B·A per targeted module, in fp32, "
        "cast to the base dtype) as sharded safetensors + model.safetensors.index.json, with config.json and "
        "any generation/tokenizer files copied. One process, streaming one tensor at a time.",
    )
    merge.add_argument(
        "checkpoint", metavar="CHECKPOINT",
        help="sharded checkpoint directory (with manifest.json), or a training run's checkpoint root (its latest)",
    )
    merge.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must be empty or absent unless --overwrite)")
    merge.add_argument("--hf-model", metavar="HF_DIR", required=True, help="the HF base model directory (safetensors)")
    merge.add_argument("--max-shard-size", default="5GB", help="largest output file, e.g. 5GB, 500MB (default 5GB)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    merge.add_argument("--no-progress", action="store_true", help="no progress bar")
    merge.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)
    inspect = commands.add_parser(
        "inspect",
        help="what a PEFT adapter holds, and whether a serving engine serves it as trained",
        description="Print the adapter's targets, ranks, scalings, dtypes and size; with --for ENGINE whether "
        "that engine would serve it as trained (and why not) and the max_lora_rank to set.",
    )
    inspect.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT adapter directory")
    inspect.add_argument("--for", dest="target", choices=TARGETS[1:], default=None, help="a serving engine")
    train = commands.add_parser(
        "train",
        help="one rank of a LoRA fine-tuning job (launch it with torchrun)",
        description=textwrap.fill(
            "Fine-tune LoRA on a megatron model built from a local HF checkpoint (or the built-in tiny "
            "model) as the YAML config says; periodic sharded checkpoints; at the end a consolidated PEFT "
            "adapter in <train.out_dir>/adapter. Overrides: section.key=value (e.g. train.steps=50 lora.r=16). "
            "Example: torchrun --nproc-per-node 2 -m dist_lora.cli train --config configs/demo.yaml", 100),
        epilog=describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML config (see configs/); omitted: all defaults")
    train.add_argument(
        "--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
        help="resume from CHECKPOINT, or without a value from the latest one in <train.out_dir>/checkpoints",
    )
    demo = commands.add_parser(
        "demo",
        help="the main job: tiny model, 2 CPU processes at TP=2, consolidated PEFT adapter, PEFT check",
        description="Create the built-in tiny Llama-family model, fine-tune LoRA on the built-in corpus with "
        "torchrun at TP=NPROC, consolidate to a PEFT adapter, load it with the real PEFT and print the "
        "maximum logits difference against the megatron model. Extra section.key=value arguments "
        "override the demo config (e.g. train.steps=50).",
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--nproc", type=int, default=2, help="processes = tensor-parallel size (default 2)")
    args, rest = parser.parse_known_args(argv)
    commands_by_name = {
        "consolidate": _consolidate, "inspect": _inspect, "merge": _merge, "train": _train, "demo": _demo,
    }
    return commands_by_name[args.command](args, rest)


if __name__ == "__main__":
    sys.exit(main())
