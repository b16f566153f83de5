"""FSDP2 at DP=2 vs one process: memory per rank and step time, for the HF bench model.

    torchrun --nproc-per-node 2 bench/fsdp2_bench.py [--rounds 3] [--json out.json]

CPU-only figures (gloo, 2 processes on a shared machine): the step-time ratio says what FSDP2's
all-gathers / reduce-scatters cost here, not what they cost on GPUs with NVLink.

The model is bench/models.py's HF Llama (random weights, fp32) with LoRA r=16 on all linear
layers. Contenders, in one torchrun job, alternating rounds (time = slowest rank):

  one     rank 0 trains the whole global batch with the unsharded LoraModel (rank 1 waits)
  fsdp2   both ranks train half of the global batch each with shard_lora_model (DP=2)

Each step is forward, backward, clip_grad_norm_ (global), AdamW step. Memory per rank:

  params / grads / optim   bytes of this rank's parameters (local shards under FSDP2), adapter
                           gradients and AdamW state: exact tensor accounting
  step peak                the resident-set high-water mark during one step minus the resident
                           set before it (VmHWM reset through /proc/self/clear_refs):
                           activations, the all-gathered layer, temporaries

Not measured: construction. Both contenders here build the whole model; dist_lora.fsdp.meta
builds on the meta device and reads only each rank's rows. On CPU its peak anonymous memory
equals that of from_pretrained + shard_lora_model (tried: 63 vs 64 MiB per rank for 2 layers),
because transformers keeps the loaded weights in mmapped safetensors pages on CPU; the
difference is on a GPU, where from_pretrained puts the whole model on every device first.
"""

from __future__ import annotations

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402  (bench/, the script's directory)
import models  # noqa: E402


def _lora(args):
    from dist_lora import LoraConfig, get_lora_model

    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", init_lora_weights="gaussian")
    return get_lora_model(models.hf_llama(args), config, seed=0)


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


class Contender:
    def __init__(self, model, tokens, labels):
        from dist_lora.fsdp import trainable_parameters

        self.model, self.tokens, self.labels = model, tokens, labels
        self.params = trainable_parameters(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.step_peak = 0

    def step(self) -> None:
        before = common.reset_peak_rss()
        loss = models.hf_loss(self.model, self.tokens, self.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # keep grads allocated: counted below
        self.step_peak = max(self.step_peak, common.peak_rss() - before)

    def memory(self) -> dict:
        return {
            "params_mib": common.mib(_local_bytes(self.model.parameters())),
            "grads_mib": common.mib(_local_bytes(p.grad for p in self.params if p.grad is not None)),
            "optim_mib": common.mib(_local_bytes(v for s in self.optimizer.state.values() for v in s.values()
                                                 if torch.is_tensor(v) and v.dim() > 0)),
            "step_peak_mib": common.mib(self.step_peak),
        }


def main() -> None:
    p = common.parser(__doc__)
    models.add_model_args(p, hidden=1024, layers=4, batch=4, seq=256, vocab=4096)
    common.add_timing_args(p, rounds=3, threads=True)
    args = p.parse_args()
    common.quiet()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    if dist.get_world_size() != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2")
    from dist_lora.fsdp import shard_lora_model

    rank = dist.get_rank()
    tokens, labels = models.batch(args)
    half = slice(rank * args.batch // 2, (rank + 1) * args.batch // 2)
    fsdp2 = Contender(shard_lora_model(_lora(args)), tokens[half], labels[half])
    single = _lora(args)  # built on every rank: get_lora_model agrees on the init seed collectively
    one = Contender(single, tokens, labels) if rank == 0 else None
    del single
    gc.collect()
    steps = {"fsdp2": fsdp2.step, "one": (one.step if one else lambda: None)}
    common.say(f"model: {models.describe(args)}, LoRA r={args.r} all-linear; FSDP2 DP=2 vs one process (CPU, gloo)")
    times = common.alternate(steps, args.rounds, args.warmup, sync=dist.barrier, reduce_max=True)
    memory = {"fsdp2": [None, None], "one": one.memory() if one else None}
    gathered = [None, None]
    dist.all_gather_object(gathered, fsdp2.memory())
    memory["fsdp2"] = gathered
    rows = [["one (rank 0)", *memory["one"].values()]] if rank == 0 else []
    rows += [[f"fsdp2 rank {r}", *m.values()] for r, m in enumerate(gathered)]
    if rank == 0:
        common.show(["contender", "params MiB", "grads MiB", "optim MiB", "step peak MiB"],
                    [[c, *(f"{v:.1f}" for v in vals)] for c, *vals in rows], "memory per rank")
    common.show_times(times, "seconds per step (slowest rank)")
    ratios = {"fsdp2 / one": common.ratio(times, "fsdp2", "one")}
    common.show_ratios(ratios, {}, "step time, FSDP2 DP=2 over one process (CPU only)")
    common.write_json(args.json, {"memory": memory, "times": common.timing_summary(times), "ratios": ratios}, args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
