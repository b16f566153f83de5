"""A minimal LoRA fine-tuning run of a Hugging Face causal LM under DeepSpeed (ZeRO 1/2/3).

    deepspeed --num_gpus 8 --module dist_lora.deepspeed.train_hf \\
        --model /path/to/hf_model --deepspeed_config configs/zero3_gpu.json --output out/

(or ``bash launch/deepspeed.sh ...``, which adds the hostfile and environment). Every rank runs
this file. The order is the one ZeRO-3 needs: the model is loaded partitioned (transformers'
``HfDeepSpeedConfig`` makes ``from_pretrained`` use ``deepspeed.zero.Init``), adapters are
injected, then ``deepspeed.initialize``. Each rank reads its own micro-batches of the packed
corpus; ``save_pretrained`` is called on every rank (rank 0 writes one full PEFT adapter).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import LoraConfig
from ..data.pipeline import PackedDataset, builtin_corpus_path, read_documents
from ..data.tokenizer import load_tokenizer
from ..model import get_lora_model
from ..tiny_model import builtin_model_dir
from .config import check_ds_config, load_ds_config
from .engine import initialize
from .setup import prepare_deepspeed


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="HF model directory, or 'builtin' (a tiny random Llama)")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config, e.g. configs/zero3_cpu.json")
    p.add_argument("--data", default=None, help=".jsonl (field 'text') or text file; default: the built-in corpus")
    p.add_argument("--output", required=True, help="directory for the PEFT adapter")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--save_every", type=int, default=0, help="also save to <output>/step_<n> every n steps (0: never)")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--target_modules", default="all-linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow_jit", action="store_true", help="let DeepSpeed JIT-compile ops the config needs")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    prepare_deepspeed()
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    config = check_ds_config(load_ds_config(args.deepspeed_config), allow_jit=args.allow_jit or None)
    deepspeed.init_distributed()  # the launcher's env:// rendezvous (gloo on CPU, NCCL on GPUs)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model_dir = builtin_model_dir() if args.model == "builtin" else args.model
    keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 -- ZeRO-3: from_pretrained loads partitioned
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = get_lora_model(
        model,
        LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=args.target_modules, task_type="CAUSAL_LM"),
        seed=args.seed,
    )
    engine, *_ = initialize(lora, config, allow_jit=args.allow_jit or None)
    tokenizer = load_tokenizer(model_dir)
    data = PackedDataset(read_documents(args.data or builtin_corpus_path()), tokenizer, args.seq_len)
    micro = engine.train_micro_batch_size_per_gpu()
    from tqdm.auto import tqdm

    bar = tqdm(range(args.steps), desc="training", disable=rank != 0)
    for step in bar:
        inputs, labels = data.batch("train", step * world + rank, micro)
        logits = engine(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        engine.backward(loss)
        engine.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.save_every and (step + 1) % args.save_every == 0:
            lora.save_pretrained(os.path.join(args.output, f"step_{step + 1}"))
            if rank == 0:
                bar.write(f"step {step + 1}/{args.steps} loss {loss.item():.4f}: adapter saved")
    bar.close()
    if rank == 0 and args.steps:
        print(f"step {args.steps}/{args.steps} loss {loss.item():.4f}", flush=True)
    lora.save_pretrained(args.output)  # every rank calls it; rank 0 writes
    if rank == 0:
        print(f"adapter saved to {args.output}", flush=True)
    # tear down before interpreter exit: gloo's threads, left to die at exit, sometimes abort
    # the process ("terminate called without an active exception") after a successful run
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
