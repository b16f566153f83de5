"""dist_lora vs PEFT LoRA step time on the same Hugging Face Llama, one process.

    python bench/vs_peft.py [--batch 4 --seq 256] [--json out.json]

Both wrap a copy of the same model (random weights, fp32; the model of lora_vs_full.py) with
LoRA r=16, alpha=32, dropout 0, target_modules="all-linear", and train with AdamW. A step is
zero_grad(set_to_none=True), forward, cross-entropy, backward, AdamW step.

Sanity first: the adapters are initialised with init_lora_weights=False (B not zero, so the
adapters change the output), dist_lora's adapter weights are loaded into PEFT's model, and
the loss of both must agree at step 0 and again after one AdamW step.

Then the two steps alternate for --rounds rounds in this process; the tables give medians,
minor page faults per step (fresh pages the kernel mapped: out-sized temporaries freed to the
OS and allocated again every step) and the ratio dist_lora / PEFT (target <= 0.93).
"""

from __future__ import annotations

import copy

import torch

import common

common.quiet()
import models  # noqa: E402

TARGET = {"dist_lora / peft": ("<=", 0.93)}


def build(args):
    import peft

    from dist_lora import LoraConfig, get_lora_model

    lora_kwargs = {**models.LORA, "r": args.r, "lora_alpha": 2 * args.r, "target_modules": "all-linear",
                   "init_lora_weights": False}
    base = models.hf_llama(args)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(**lora_kwargs))
    theirs = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs))
    result = peft.set_peft_model_state_dict(theirs, ours.adapter_state_dict())
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"adapter weights did not map onto PEFT: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}")
    return {"dist_lora": ours, "peft": theirs}


class Trainer:
    def __init__(self, model, args) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        self.tokens, self.labels = models.batch(args)

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)
        loss = models.hf_loss(self.model, self.tokens, self.labels)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def main() -> None:
    p = common.parser(__doc__)
    models.add_model_args(p, hidden=1024, layers=4, batch=4, seq=256, vocab=4096)
    common.add_timing_args(p, rounds=12, threads=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    common.say(f"HF Llama, one process, {torch.get_num_threads()} threads: {models.describe(args)}; "
               f"LoRA r={args.r} all-linear; AdamW\n")
    trainers = {name: Trainer(model, args) for name, model in build(args).items()}
    n_ours = sum(p.numel() for p in trainers["dist_lora"].model.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in trainers["peft"].model.parameters() if p.requires_grad)
    losses = {n: [t.step(), t.step()] for n, t in trainers.items()}  # the losses of step 0 and step 1
    diffs = [abs(a - b) for a, b in zip(losses["dist_lora"], losses["peft"])]
    same = n_ours == n_theirs and max(diffs) < 1e-4
    common.show(["", "dist_lora", "peft", "|difference|"],
                [["trainable params", f"{n_ours:,}", f"{n_theirs:,}", n_ours - n_theirs],
                 ["loss at step 0", f"{losses['dist_lora'][0]:.6f}", f"{losses['peft'][0]:.6f}", f"{diffs[0]:.2e}"],
                 ["loss after 1 AdamW step", f"{losses['dist_lora'][1]:.6f}", f"{losses['peft'][1]:.6f}", f"{diffs[1]:.2e}"]],
                f"Sanity (same weights in both): {'same' if same else 'DIFFERENT'}")
    common.say(f"timing: {args.warmup} warm-up + {args.rounds} alternating rounds")
    faults: dict = {}
    times = common.alternate({n: t.step for n, t in trainers.items()}, args.rounds, args.warmup, faults=faults)
    ratios = {"dist_lora / peft": common.ratio(times, "dist_lora", "peft")}
    common.show_times(times, "Step time (s)", faults)
    common.show_ratios(ratios, TARGET, "Step-time ratio")
    common.write_json(args.json, {"model": models.describe(args), "sanity": {"losses": losses, "same": same,
                                  "trainable": {"dist_lora": n_ours, "peft": n_theirs}},
                                  "timing": common.timing_summary(times, faults), "ratios": ratios}, args)


if __name__ == "__main__":
    main()
