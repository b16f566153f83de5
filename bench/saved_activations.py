"""Activation memory: bytes saved for backward by fused vs reference tensor-parallel LoRA.

    torchrun --nproc-per-node 2 bench/saved_activations.py [--json out.json]
    python bench/saved_activations.py            # one process: TP=1, SP off only

What is measured: during forward, ``torch.autograd.graph.saved_tensors_hooks`` sees every
tensor autograd keeps for backward; the bytes of their storages are summed, counting a storage
once however many tensors view it, and leaving out parameters and buffers (a saved frozen
weight costs no memory). Numbers are per rank (this rank's shards), after the forward pass:
what is held until backward.

Table 1, one LoRA layer, input [seq/TP (SP) or seq, batch, hidden] with requires_grad:
  column  ColumnParallelLinear hidden -> 2*ffn (shaped like a gated fc1)
  row     RowParallelLinear ffn -> hidden (like fc2), input_is_parallel
for the frozen base layer alone, fused LoRA, fused with keep_gathered_input, reference LoRA.
Table 2, a whole GPTModel forward (the model of tp_collectives.py; word embedding trainable in
every mode so that the whole backward graph is recorded), total and per transformer layer.
"""

from __future__ import annotations

import os

import torch

import common

common.quiet()
import models  # noqa: E402
from dist_lora.layers.parallel import LoraColumnParallelLinear, LoraRowParallelLinear  # noqa: E402
from dist_lora.parallel.setup import init_distributed, shutdown_distributed  # noqa: E402

MODES = ["base", "fused", "fused-keep", "reference"]


def layer(kind: str, mode: str, args, tp: int, sp: bool):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    s = models.shape(args)
    config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                                 gradient_accumulation_fusion=False, params_dtype=torch.float32)
    init = torch.nn.init.xavier_normal_
    if kind == "column":
        base = ColumnParallelLinear(s["hidden"], 2 * s["ffn"], config=config, init_method=init, bias=False,
                                    gather_output=False)
    else:
        base = RowParallelLinear(s["ffn"], s["hidden"], config=config, init_method=init, bias=False,
                                 input_is_parallel=True, skip_bias_add=False)
    base.requires_grad_(False)
    if mode == "base":
        return base
    wrapper = LoraColumnParallelLinear if kind == "column" else LoraRowParallelLinear
    comm, keep = ("fused", True) if mode == "fused-keep" else (mode, False)
    lora = wrapper(base, tp_comm=comm, keep_gathered_input=keep)
    lora.update_layer("default", r=args.r, lora_alpha=2 * args.r, seed=0)
    return lora


def layer_bytes(kind: str, mode: str, args, tp: int, sp: bool) -> int:
    module = layer(kind, mode, args, tp, sp)
    s = models.shape(args)
    features = s["hidden"] if kind == "column" else s["ffn"] // tp  # row: this rank's feature shard
    seq = args.seq // tp if sp else args.seq
    x = torch.randn(seq, args.batch, features, requires_grad=True)
    with common.SavedTensorMeter(module) as meter:
        out, _ = module(x)
    out.sum().backward()  # the graph runs (all ranks take part in its collectives)
    return meter.bytes


def model_bytes(mode: str, args, tp: int, sp: bool) -> int:
    model, _ = models.gpt_variant(args, tp, sp, mode)
    return models.gpt_saved_bytes(model, args)


def main() -> None:
    p = common.parser(__doc__)
    models.add_model_args(p, hidden=1024, layers=2, batch=2, seq=256, vocab=4096)
    p.add_argument("--no-model", action="store_true", help="only the single-layer table")
    args = p.parse_args()
    common.single_process_env()
    tp = int(os.environ["WORLD_SIZE"])
    init_distributed(tp=tp)
    common.say(f"TP={tp}; {models.describe(args)}; LoRA r={args.r}. Bytes saved for backward during forward, "
               "per rank, parameters excluded, storages counted once.\n")
    sps = [False, True] if tp > 1 else [False]
    out = {"model": models.describe(args), "tp": tp, "layer": {}, "model_step": {}}
    rows = []
    for kind in ("column", "row"):
        for sp in sps:
            res = {m: layer_bytes(kind, m, args, tp, sp) for m in MODES if m != "fused-keep" or (sp and kind == "column")}
            out["layer"][f"{kind}_sp_{'on' if sp else 'off'}"] = res
            rows.append([kind, "on" if sp else "off", *(common.mib(res[m]) if m in res else None for m in MODES),
                         res["fused"] / res["reference"]])
    common.show(["layer", "SP", *(f"{m} MiB" for m in MODES), "fused / reference"], rows,
                 "Saved for backward by one layer (MiB per rank)")
    if not args.no_model:
        rows = []
        for sp in sps:
            res = {m: model_bytes(m, args, tp, sp) for m in MODES if m != "fused-keep" or sp}
            out["model_step"][f"sp_{'on' if sp else 'off'}"] = res
            for m, b in res.items():
                rows.append([m, "on" if sp else "off", common.mib(b), common.mib((b - res["base"]) / args.layers),
                             b / res["reference"]])
        common.show(["mode", "SP", "total MiB", "LoRA extra MiB per layer", "/ reference"], rows,
                    f"Saved for backward by a whole GPTModel forward ({args.layers} layers, MiB per rank)")
    common.write_json(args.json, out, args)
    shutdown_distributed()


if __name__ == "__main__":
    main()
