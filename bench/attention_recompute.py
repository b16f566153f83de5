"""Attention and activation recompute on one CPU process: what a LoRA step keeps for backward,
and the step time of SDPA attention against megatron's local attention.

    python bench/attention_recompute.py [--seq 1024] [--rounds 6] [--json out.json]

Table 1: bytes autograd saves for backward during the forward of a LoRA GPTModel (frozen base,
adapters on every linear), per recompute setting (none / selective / full) and attention
(megatron's local core attention / dist_lora's SDPA); parameters excluded, storages counted
once (bench/common.SavedTensorMeter). Table 2: forward + backward time of the same model with
SDPA vs megatron attention at ``--seq`` tokens, alternating rounds in one process (1 torch
thread), recompute none. CPU figures only: on a GPU SDPA runs flash / memory-efficient kernels.
"""

from __future__ import annotations

import torch

import common

common.quiet()
import models  # noqa: E402
from dist_lora import LoraConfig, get_lora_model  # noqa: E402
from dist_lora.parallel.recompute import RECOMPUTE, inputs_require_grad, recompute_settings  # noqa: E402
from dist_lora.parallel.setup import init_distributed, shutdown_distributed  # noqa: E402


def lora_gpt(args, recompute: str, sdpa: bool):
    base = models.megatron_gpt(args, 1, False, sdpa=sdpa, **recompute_settings(recompute))
    model = get_lora_model(base, LoraConfig(**{**models.LORA, "r": args.r, "lora_alpha": 2 * args.r}))
    inputs_require_grad(model)
    return model


def saved_bytes(args, recompute: str, sdpa: bool) -> int:
    return models.gpt_saved_bytes(lora_gpt(args, recompute, sdpa), args)


def main() -> None:
    p = common.parser(__doc__)
    models.add_model_args(p, hidden=512, layers=2, batch=1, seq=1024, vocab=4096)
    common.add_timing_args(p, rounds=6)
    args = p.parse_args()
    torch.set_num_threads(1)
    common.single_process_env()
    init_distributed(tp=1)
    common.say(f"{models.describe(args)}; LoRA r={args.r} on every linear, frozen base, one process.\n")
    out = {"model": models.describe(args), "saved_bytes": {}, "step_seconds": {}}
    rows = []
    for recompute in RECOMPUTE:
        res = {name: saved_bytes(args, recompute, sdpa) for name, sdpa in (("megatron", False), ("sdpa", True))}
        out["saved_bytes"][recompute] = res
        rows.append([recompute, common.mib(res["megatron"]), common.mib(res["sdpa"]), res["sdpa"] / res["megatron"]])
    none = out["saved_bytes"]["none"]["megatron"]
    for row in rows:
        row.append(out["saved_bytes"][row[0]]["megatron"] / none)
    common.show(["recompute", "megatron attn MiB", "SDPA MiB", "SDPA / megatron", "megatron / no recompute"], rows,
                "Saved for backward by one forward (MiB)")
    tokens, labels = models.batch(args)
    contenders = {name: lora_gpt(args, "none", sdpa) for name, sdpa in (("megatron", False), ("sdpa", True))}

    def step(model):
        def run():
            models.gpt_loss(model, tokens, labels).backward()
            model.zero_grad(set_to_none=True)
        return run

    times = common.alternate({name: step(m) for name, m in contenders.items()}, args.rounds, args.warmup)
    out["step_seconds"] = common.timing_summary(times)
    out["sdpa_over_megatron"] = common.ratio(times, "sdpa", "megatron")
    common.show_times(times, f"forward + backward at seq {args.seq} (seconds)")
    r = out["sdpa_over_megatron"]
    common.say(f"SDPA / megatron step time: {r['ratio_of_medians']:.3f} (paired {r['median_paired_ratio']:.3f}, "
               f"p25-p75 {r['paired_p25']:.3f}-{r['paired_p75']:.3f})")
    common.write_json(args.json, out, args)
    shutdown_distributed()


if __name__ == "__main__":
    main()
