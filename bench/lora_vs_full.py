"""LoRA vs full fine-tuning vs frozen base, one process, a Hugging Face Llama.

    python bench/lora_vs_full.py [--batch 4 --seq 256] [--json out.json]

The model (random weights, fp32) is Llama-shaped: hidden 1024, 4 layers by default (see
--help of the size flags). Contenders, each its own copy of the same weights:

  base   frozen base: forward + backward with only the word embedding trainable, so backward
         runs through every layer (dgrad everywhere, no weight gradient except the
         embedding's); no optimizer step: there is nothing to train
  lora   dist_lora LoRA, r=16, alpha=32, target_modules="all-linear" (q/k/v/o, gate/up/down);
         forward + backward + AdamW step on the adapters
  full   full fine-tuning: every parameter trainable; forward + backward + AdamW step
  peft   PEFT's LoRA with the same settings, as the reference the targets were measured with
         (--no-peft leaves it out)

Step times are measured in alternating rounds in this one process (medians, ratios), with
the minor page faults of each step (fresh pages the kernel mapped for it).

Memory, two ways (bytes, per contender):
  accounted  exact, from the tensors: parameters + gradients + AdamW state + activations
             saved for backward (saved_tensors_hooks over the forward, storages counted once,
             parameters excluded). A sum of exact pieces: an upper bound of the tensor bytes
             alive at once (zero_grad(set_to_none=True) frees grads before the forward, and
             backward frees activations as it creates grads).
  peak RSS   measured: each contender runs 2 steps in a fresh Python process; the number is the
             peak resident set size of that process during the steps minus its size just
             before them (model already built; Linux VmHWM, reset through /proc/self/clear_refs).
             It includes allocator slack and temporaries that the accounting leaves out.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import common

common.quiet()
import models  # noqa: E402

TARGETS = {"lora / base": ("<=", 1.06), "lora / full": ("<=", 0.70), "lora / peft": ("<=", 0.93)}
PEFT_REFERENCE = {"peft / base": 1.12, "peft / full": 0.74}  # the PEFT measurements


def lora_config(args):
    from dist_lora import LoraConfig

    return LoraConfig(**{**models.LORA, "r": args.r, "lora_alpha": 2 * args.r}, target_modules="all-linear")


def peft_model(base, args):
    import peft

    config = peft.LoraConfig(**{**models.LORA, "r": args.r, "lora_alpha": 2 * args.r}, target_modules="all-linear")
    return peft.get_peft_model(base, config)


class Contender:
    def __init__(self, name: str, base: torch.nn.Module, args) -> None:
        self.name = name
        model = copy.deepcopy(base)
        if name == "base":
            model.requires_grad_(False)
            model.get_input_embeddings().weight.requires_grad_(True)
        elif name == "lora":
            from dist_lora import get_lora_model

            model = get_lora_model(model, lora_config(args))
        elif name == "peft":
            model = peft_model(model, args)
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = None if name == "base" else torch.optim.AdamW(trainable, lr=1e-5)
        self.tokens, self.labels = models.batch(args)
        self.saved_bytes = 0

    def step(self, measure: bool = False) -> None:
        self.model.zero_grad(set_to_none=True)
        if measure:
            with common.SavedTensorMeter(self.model) as meter:
                loss = models.hf_loss(self.model, self.tokens, self.labels)
            self.saved_bytes = meter.bytes
        else:
            loss = models.hf_loss(self.model, self.tokens, self.labels)
        loss.backward()
        if self.optimizer:
            self.optimizer.step()

    def accounting(self) -> dict:
        params = list(self.model.parameters())
        trainable = [p for p in params if p.requires_grad]
        return {
            "params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in trainable),
            "param_bytes": common.tensor_bytes(params),
            "grad_bytes": common.tensor_bytes(trainable),
            "optimizer_bytes": common.optimizer_state_bytes(self.optimizer) if self.optimizer else 0,
            "saved_activation_bytes": self.saved_bytes,
        }


def child(name: str, args) -> None:
    """Run in a fresh process: build, reset the peak, 2 steps, print the peak increase as JSON."""
    torch.set_num_threads(args.threads)
    contender = Contender(name, models.hf_llama(args), args)
    baseline = common.reset_peak_rss()
    for _ in range(2):
        contender.step()
    print(json.dumps({"peak_rss_increase": common.peak_rss() - baseline, "baseline_rss": baseline}))


def main() -> None:
    p = common.parser(__doc__)
    models.add_model_args(p, hidden=1024, layers=4, batch=4, seq=256, vocab=4096)
    common.add_timing_args(p, rounds=8, threads=True)
    p.add_argument("--no-peft", action="store_true", help="leave out the PEFT reference contender")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one contender's peak-RSS run
    args = p.parse_args()
    if args.child:
        return child(args.child, args)
    torch.set_num_threads(args.threads)
    names = ["base", "lora", "full"] + ([] if args.no_peft else ["peft"])
    common.say(f"HF Llama, one process, {torch.get_num_threads()} threads: {models.describe(args)}; "
               f"LoRA r={args.r} all-linear; AdamW\n")
    base = models.hf_llama(args)
    contenders = {n: Contender(n, base, args) for n in names}
    del base
    for c in contenders.values():
        c.step(measure=True)  # the saved-activation accounting; doubles as a warm-up
    common.say(f"timing: {args.warmup} warm-up + {args.rounds} alternating rounds")
    faults: dict = {}
    times = common.alternate({n: c.step for n, c in contenders.items()}, args.rounds, args.warmup, faults=faults)
    ratios = {"lora / base": common.ratio(times, "lora", "base"), "lora / full": common.ratio(times, "lora", "full")}
    if "peft" in contenders:
        ratios.update({"peft / base": common.ratio(times, "peft", "base"), "peft / full": common.ratio(times, "peft", "full"),
                       "lora / peft": common.ratio(times, "lora", "peft")})
    common.show_times(times, "Step time (s)", faults)
    common.show_ratios(ratios, TARGETS, "Step-time ratios (the issue measured PEFT at 1.12 vs base and 0.74 vs full)")

    memory = {n: c.accounting() for n, c in contenders.items()}
    if not args.no_rss:
        common.say("peak RSS: one fresh process per contender ...")
        flags = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "batch", "seq", "vocab", "r", "threads")]
        for n in names:
            memory[n].update(common.run_child([*flags, "--child", n]))
    rows = []
    for n, m in memory.items():
        total = m["param_bytes"] + m["grad_bytes"] + m["optimizer_bytes"] + m["saved_activation_bytes"]
        m["accounted_bytes"] = total
        rows.append([n, f"{m['trainable']:,}", f"{100 * m['trainable'] / m['params']:.3f}%", common.mib(m["param_bytes"]),
                     common.mib(m["grad_bytes"]), common.mib(m["optimizer_bytes"]), common.mib(m["saved_activation_bytes"]),
                     common.mib(total), common.mib(m["peak_rss_increase"]) if "peak_rss_increase" in m else None])
    common.show(["contender", "trainable params", "trainable %", "params MiB", "grads MiB", "AdamW MiB", "saved act. MiB",
                 "accounted MiB", "peak RSS +MiB"], rows,
                "Memory (accounted = params + grads + AdamW state + saved activations; "
                "peak RSS + = measured increase over the built model during 2 steps)")
    common.say("base: only the word embedding has requires_grad (so that backward runs through every layer); "
               "it is never stepped, so it has no AdamW state.\n")
    common.write_json(args.json, {"model": models.describe(args), "timing": common.timing_summary(times, faults), "ratios": ratios,
                                  "memory": memory, "peft_reference_ratios": PEFT_REFERENCE}, args)


if __name__ == "__main__":
    main()
