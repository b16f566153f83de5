"""The ``dist-lora`` command line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _example(args: argparse.Namespace, rest: list[str]) -> int:
    """Launch the tensor-parallel example under torchrun on this machine."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        "-m", "dist_lora.example", "--out", args.out, *rest,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(command, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dist-lora",
        description="PEFT-compatible LoRA for megatron-core tensor/sequence-parallel models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    example = commands.add_parser(
        "example",
        help="run a small tensor-parallel LoRA fine-tune on CPU processes",
        description="Fine-tune LoRA on a tiny random megatron GPTModel at TP=NPROC, save a sharded "
        "adapter checkpoint and reload it. Extra arguments go to the example "
        "(--steps N, --sequence-parallel).",
    )
    example.add_argument("--nproc", type=int, default=2, help="processes = tensor-parallel size (default 2)")
    example.add_argument("--out", default="runs/example", help="checkpoint directory (default runs/example)")
    args, rest = parser.parse_known_args(argv)
    return {"example": _example}[args.command](args, rest)


if __name__ == "__main__":
    sys.exit(main())
