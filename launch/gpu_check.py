"""The one-GPU check: build a random Llama-shaped model, fine-tune it with ``dist-lora train``
(bf16, SDPA, megatron with recompute none and full, and the HF model under FSDP2) and with
transformers + PEFT on the same model, batch, LoRA targets and rank, compare throughput, and
check that PEFT loads the released adapter with the megatron model's logits. Figures go to
``OUT_DIR/gpu_check.json`` and a table.

    bash launch/gpu_check.sh OUT_DIR            # one NVIDIA GPU, no network; about 1B parameters
    python launch/gpu_check.py OUT_DIR --tiny --device cpu   # the same steps on a tiny model (CI)

Needs torch, megatron-core, transformers, peft and dist_lora importable (no downloads: the model,
its data and tokenizer-free byte input are made here). Tolerance for the logits check: bf16
keeps 8 significand bits, so the megatron bf16 logits and PEFT's fp32 logits of the same adapter
differ by rounding; the check passes when the maximum difference is below ``--tolerance``
(default 0.1) and below a fifth of the adapter's own effect on the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from dist_lora.quiet import filter_third_party_notices

filter_third_party_notices()
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}
LORA = {"r": 16, "lora_alpha": 32}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = linear_qkv/proj/fc1/fc2


def build_model(out: str, shape: dict, dtype: torch.dtype) -> str:
    """A random Llama of ``shape`` saved as a local HF checkpoint (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.path.join(out, "model")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, rms_norm_eps=1e-5)).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_corpus(out: str, chars: int) -> str:
    """Random words (byte-tokenised by dist_lora's built-in tokenizer: the model dir has none)."""
    import random

    path = os.path.join(out, "corpus.txt")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    text, size = [], 0
    while size < chars:
        paragraph = " ".join(rng.choice(words) for _ in range(200))
        text.append(paragraph)
        size += len(paragraph) + 2
    with open(path, "w") as f:
        f.write("\n\n".join(text))
    return path


def dist_lora_run(args, model_dir: str, corpus: str, recompute: str, backend: str = "megatron") -> dict:
    out = os.path.join(args.out, f"dist_lora_{backend}_{recompute}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "dist_lora.cli",
        "train", f"parallel.backend={backend}", f"model.hf_dir={model_dir}", f"model.dtype={args.dtype}", "model.attention=sdpa",
        f"train.device={args.device}", f"train.recompute={recompute}", f"data.path={corpus}",
        f"data.seq_len={args.seq}", "data.eval_fraction=0.01", f"train.steps={args.steps}", "train.eval_interval=0",
        f"train.micro_batch_size={args.batch}", "train.checkpoint_interval=0", "train.keep_last=1",
        f"train.out_dir={out}", f"lora.r={LORA['r']}", f"lora.lora_alpha={LORA['lora_alpha']}", "optim.lr=1e-3",
        "optim.warmup_steps=0", "optim.schedule=constant",
        *([f"train.peak_tflops={args.peak_tflops}"] if args.device == "cuda" else []),
    ]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "8")})
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def peft_run(args, model_dir: str, corpus: str, dtype: torch.dtype) -> dict:
    """transformers + PEFT, same model, targets, rank, batch shape and steps; tokens/s after one warm-up step."""
    import peft
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(**LORA, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.tensor(list(open(corpus, "rb").read()[: (args.steps + 1) * args.batch * (args.seq + 1)]))
    windows = data.view(-1, args.seq + 1).to(device)
    times = []
    for step in range(args.steps + 1):
        ids = windows[step * args.batch : (step + 1) * args.batch]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sum(times[1:])
    return {"tokens_per_s": args.steps * args.batch * args.seq / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def logits_check(run: dict, model_dir: str, tolerance: float) -> dict:
    """PEFT (fp32, CPU) with the released adapter vs the megatron run's probe logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    probe = load_file(run["probe"])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        without = base(input_ids=probe["tokens"]).logits
        logits = PeftModel.from_pretrained(base, run["adapter"]).eval()(input_ids=probe["tokens"]).logits
    diff, effect = (logits - probe["logits"]).abs().max().item(), (logits - without).abs().max().item()
    return {"max_abs_diff": diff, "adapter_effect": effect, "tolerance": tolerance,
            "ok": diff < tolerance and diff < effect / 5}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory (model, runs, gpu_check.json)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (for a CPU try-out)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096; tiny: 64)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 20; tiny: 4)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak for MFU (H100/H200: 989)")
    p.add_argument("--tolerance", type=float, default=0.1, help="max |logits difference| PEFT vs megatron")
    args = p.parse_args()
    args.seq = args.seq or (64 if args.tiny else 4096)
    args.steps = args.steps or (4 if args.tiny else 20)
    os.makedirs(args.out, exist_ok=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model_dir = build_model(args.out, SHAPES["tiny" if args.tiny else "1b"], dtype)
    corpus = write_corpus(args.out, chars=(args.steps + 4) * args.batch * (args.seq + 1) * 110 // 100 + 200_000)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": vars(args)}
    results["dist_lora"] = {r: dist_lora_run(args, model_dir, corpus, r) for r in ("none", "full")}
    try:  # never run on a GPU before: a failure here is reported, and the other figures still come out
        results["dist_lora_fsdp2"] = dist_lora_run(args, model_dir, corpus, "none", backend="fsdp2")
    except subprocess.CalledProcessError as err:
        results["dist_lora_fsdp2"] = {"error": f"exit code {err.returncode}", "tokens_per_s": 0.0, "mfu": None,
                                      "peak_memory_gib": None}
    results["peft"] = peft_run(args, model_dir, corpus, dtype)
    results["dist_lora_over_peft_tokens_per_s"] = results["dist_lora"]["none"]["tokens_per_s"] / results["peft"]["tokens_per_s"]
    results["logits"] = logits_check(results["dist_lora"]["none"], model_dir, args.tolerance)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    rows = [(f"dist_lora recompute={r}", s["tokens_per_s"], s["mfu"], s["peak_memory_gib"]) for r, s in results["dist_lora"].items()]
    fsdp2 = results["dist_lora_fsdp2"]
    rows.append(("dist_lora fsdp2 (HF model)" + (" FAILED" if "error" in fsdp2 else ""), fsdp2["tokens_per_s"], fsdp2["mfu"], fsdp2["peak_memory_gib"]))
    rows.append(("transformers + PEFT", results["peft"]["tokens_per_s"], None, results["peft"]["peak_memory_gib"]))
    print(f"\n{results['device']}, {args.dtype}, seq {args.seq} x batch {args.batch}, {args.steps} steps")
    print(f"{'run':28} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for name, tps, mfu, mem in rows:
        print(f"{name:28} {tps:10.0f} {'-' if mfu is None else f'{100 * mfu:.1f}%':>7} {'-' if mem is None else f'{mem:.1f}':>9}")
    print(f"dist_lora / PEFT tokens/s: {results['dist_lora_over_peft_tokens_per_s']:.3f}")
    check = results["logits"]
    print(f"PEFT vs megatron logits: max |diff| {check['max_abs_diff']:.3e} (tolerance {check['tolerance']}, "
          f"adapter effect {check['adapter_effect']:.3e}): {'OK' if check['ok'] else 'FAILED'}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
