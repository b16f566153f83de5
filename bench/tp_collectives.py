"""Collectives and step times of a tensor-parallel GPTModel: frozen base vs fused vs reference LoRA.

    torchrun --nproc-per-node 2 bench/tp_collectives.py [--hidden 1024] [--json out.json]

A megatron-core GPTModel (Llama-shaped, random weights) at TP = world size, over gloo on CPU,
with sequence parallelism off and on. Modes (one model each, same weights):

  base        frozen base: no adapters; only the word embedding is trainable, so backward
              runs through every layer and the base's own collectives all happen
  fused       dist_lora LoRA (r=16, linear_qkv/proj/fc1/fc2), tp_comm="fused"
  fused-keep  the same with keep_gathered_input=True (SP on only; no effect with SP off)
  reference   dist_lora LoRA, tp_comm="reference" (PEFT's design: one r-sized collective per
              LoRA layer per pass)

One step = zero grads, forward, backward, finalize_lora_grads (the once-per-step sum of the
replicated factors' partial gradients), AdamW on the adapters. The word embedding is
trainable in every mode (its gradient is computed, never stepped) so that all modes run the
same backward; LoRA modes then differ from base only by LoRA.

Table 1 counts the collectives of one step (exact, from dist_lora.parallel.comm_counter) and
checks: fused (SP off) and fused-keep = base + exactly one all_reduce whose bytes equal the
replicated factors' gradients. Table 2 times the modes in alternating rounds in this one job
(time of a step = slowest rank) and gives the ratios LoRA / frozen base and fused / reference.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import torch.distributed as dist

import common

common.quiet()
import models  # noqa: E402
from dist_lora.layers.parallel import LoraColumnParallelLinear, LoraRowParallelLinear  # noqa: E402
from dist_lora.parallel.comm_counter import CollectiveCounter  # noqa: E402
from dist_lora.parallel.grads import finalize_lora_grads, tp_partial_grad_parameters  # noqa: E402
from dist_lora.parallel.setup import init_distributed, shutdown_distributed  # noqa: E402

TARGETS = {"fused / base": ("<=", 1.06), "fused / reference": ("<=", 1.0), "fused-keep / reference": ("<=", 1.0)}


class Mode:
    """One model and its training step."""

    def __init__(self, name: str, args, tp: int, sp: bool) -> None:
        self.name = name
        model, self.embedding = models.gpt_variant(args, tp, sp, name)
        adapters = [p for p in model.parameters() if p.requires_grad and p is not self.embedding]
        self.model = model
        self.optimizer = torch.optim.AdamW(adapters, lr=1e-4) if adapters else None
        self.tokens, self.labels = models.batch(args)

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        models.gpt_loss(self.model, self.tokens, self.labels).backward()
        finalize_lora_grads(self.model)
        if self.optimizer:
            self.optimizer.step()

    def replicated_factor_bytes(self) -> int:
        """Bytes of the replicated LoRA factors (column A, row B): what a once-per-step sum may cost."""
        total = 0
        for m in self.model.modules():
            if isinstance(m, LoraColumnParallelLinear):
                total += common.tensor_bytes(a.weight for a in m.lora_A.values())
            elif isinstance(m, LoraRowParallelLinear):
                total += common.tensor_bytes(p for b in m.lora_B.values() for p in b.parameters())
        return total


def count(mode: Mode) -> dict:
    mode.step()  # warm-up: lazily built buffers and optimizer state
    with CollectiveCounter() as counter:
        mode.step()
    return {
        "counts": dict(counter.counts),
        "bytes": dict(counter.bytes),
        "partial_grad_bytes": common.tensor_bytes(tp_partial_grad_parameters(mode.model)),
        "replicated_factor_bytes": mode.replicated_factor_bytes() if mode.name != "base" else 0,
    }


def extra(a: dict, b: dict) -> dict:
    diff = Counter(a)
    diff.subtract(Counter(b))
    return {k: v for k, v in diff.items() if v}


def collectives_rows(sp: bool, results: dict) -> list[list]:
    base = results["base"]
    kinds = sorted({k for r in results.values() for k in r["counts"]})
    rows = []
    for name, r in results.items():
        more_calls, more_bytes = extra(r["counts"], base["counts"]), extra(r["bytes"], base["bytes"])
        extra_bytes = sum(more_bytes.values())
        verdict = ""
        if name in ("fused", "fused-keep") and (name == "fused-keep" or not sp):
            ok = more_calls == {"all_reduce": 1} and extra_bytes <= r["replicated_factor_bytes"]
            verdict = "met" if ok else "MISSED"
        r["extra_calls"], r["extra_bytes"], r["verdict"] = more_calls, extra_bytes, verdict
        rows.append([
            name, "on" if sp else "off", *(r["counts"].get(k, 0) for k in kinds), sum(r["counts"].values()),
            common.mib(sum(r["bytes"].values())), ", ".join(f"+{v} {k}" for k, v in more_calls.items()) or "-",
            common.mib(extra_bytes), common.mib(r["replicated_factor_bytes"]), verdict,
        ])
    return kinds, rows


def main() -> None:
    p = common.parser(__doc__)
    models.add_model_args(p, hidden=1024, layers=2, batch=2, seq=256, vocab=4096)
    common.add_timing_args(p, rounds=25)
    p.add_argument("--sp", choices=["off", "on", "both"], default="both", help="sequence parallelism (default both)")
    p.add_argument("--no-timing", action="store_true", help="count collectives only")
    args = p.parse_args()
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    init_distributed(tp=tp)
    common.say(f"GPTModel at TP={tp} over gloo, {torch.get_num_threads()} thread(s) per rank: {models.describe(args)}; "
               f"LoRA r={args.r} on linear_qkv/proj/fc1/fc2\n")
    out = {"model": models.describe(args), "tp": tp, "collectives": {}, "timing": {}}
    for sp in {"off": [False], "on": [True], "both": [False, True]}[args.sp]:
        if sp and tp == 1:
            common.say("SP needs TP > 1; skipped")
            continue
        names = ["base", "fused"] + (["fused-keep"] if sp else []) + ["reference"]
        modes = {n: Mode(n, args, tp, sp) for n in names}
        results = {n: count(m) for n, m in modes.items()}
        kinds, rows = collectives_rows(sp, results)
        common.show(["mode", "SP", *kinds, "calls", "MiB", "extra calls vs base", "extra MiB", "replicated factors MiB",
                     "target"], rows, f"Collectives per training step (per rank), SP {'on' if sp else 'off'}")
        key = f"sp_{'on' if sp else 'off'}"
        out["collectives"][key] = results
        if args.no_timing:
            continue
        common.say(f"timing, SP {'on' if sp else 'off'}: {args.warmup} warm-up + {args.rounds} alternating rounds")
        times = common.alternate({n: m.step for n, m in modes.items()}, args.rounds, args.warmup,
                                 sync=dist.barrier, reduce_max=True)
        lora = [n for n in names if n != "base"]
        ratios = {f"{n} / base": common.ratio(times, n, "base") for n in lora}
        ratios.update({f"{n} / reference": common.ratio(times, n, "reference") for n in lora if n != "reference"})
        common.show_times(times, f"Step time (slowest rank), SP {'on' if sp else 'off'}")
        common.show_ratios(ratios, TARGETS, f"Step-time ratios, SP {'on' if sp else 'off'}")
        out["timing"][key] = {"steps": common.timing_summary(times), "ratios": ratios}
        del modes
    common.write_json(args.json, out, args)
    shutdown_distributed()


if __name__ == "__main__":
    main()
