"""In-memory adapter export (dist_lora.export.adapter_tensors) vs save_sharded + consolidate.

    torchrun --nproc-per-node 2 bench/export_bench.py [--size demo|large] [--rounds 3] [--json out.json]

A megatron GPTModel at TP = world size (gloo, CPU) built from a random Llama-family HF model:
``demo`` is the built-in tiny model of ``dist-lora demo`` with its LoRA (r=16, alpha=32,
qkv/proj/fc1/fc2); ``large`` a synthetic one (hidden 1024, 8 layers, 16 heads in 4 groups,
FFN 2816, r=64). Contenders, timed in alternating rounds (time = slowest rank):

  export        adapter_tensors(model, naming="vllm") -> {name: tensor} on rank 0
  file          save_sharded(model, dir) on every rank, then rank 0 runs
                consolidate(dir, out, target="vllm") and loads the written file
  handshake     the arrival check that export runs first (parallel.handshake.all_arrive) alone:
                its share of the export time

Peak extra memory is rank 0's resident-set high-water mark during the call minus its resident
set before it (VmHWM reset through /proc/self/clear_refs), next to the adapter's size. The
results are checked equal bit for bit. Nothing here asserts a time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402  (bench/, the script's directory)

SIZES = {
    "demo": (None, dict(r=16, lora_alpha=32)),
    "large": (dict(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=128),
              dict(r=64, lora_alpha=128)),
}


def _peak(fn) -> tuple[object, int]:
    """fn()'s result and the peak resident memory it added in this process."""
    before = common.reset_peak_rss()
    result = fn()
    return result, common.peak_rss() - before


def _hf_dir(size: str, work: str) -> str:
    from dist_lora.tiny_model import builtin_model_dir

    arch, _ = SIZES[size]
    if arch is None:
        return builtin_model_dir()
    path = os.path.join(work, "hf")
    if common.rank() == 0:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**arch, tie_word_embeddings=False)).save_pretrained(path)
    dist.barrier()
    return path


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    common.add_timing_args(p, rounds=3)
    args = p.parse_args()
    common.quiet()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    from dist_lora import LoraConfig, get_lora_model
    from dist_lora.bridges import build_megatron_gpt
    from dist_lora.checkpoint.sharded import save_sharded
    from dist_lora.export import adapter_tensors
    from dist_lora.parallel.handshake import all_arrive
    from dist_lora.parallel.cpu_compat import apply_cpu_compat
    from dist_lora.release.consolidate import consolidate
    from safetensors.torch import load_file
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_compat()
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234)
    work = tempfile.mkdtemp(prefix="export_bench_") if common.rank() == 0 else None
    holder = [work]
    dist.broadcast_object_list(holder)
    work = holder[0]
    hf = _hf_dir(args.size, work)
    model = get_lora_model(build_megatron_gpt(hf, tp=tp), LoraConfig(init_lora_weights=False, **SIZES[args.size][1]),
                           seed=0)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n) * tp
    results: dict[str, list] = {"export": [], "file": [], "handshake": []}

    def export():
        out, peak = _peak(lambda: adapter_tensors(model, naming="vllm", hf_model_dir=hf))
        results["export"].append((out, peak))

    def file():
        ckpt, out_dir = os.path.join(work, "ckpt"), os.path.join(work, "out")

        def save_and_consolidate():
            save_sharded(model, ckpt)
            if common.rank() != 0:
                return None
            consolidate(ckpt, out_dir, hf_model_dir=hf, target="vllm", overwrite=True, show_progress=False)
            return load_file(os.path.join(out_dir, "adapter_model.safetensors"))

        out, peak = _peak(save_and_consolidate)
        results["file"].append((out, peak))

    def handshake():
        results["handshake"].append(_peak(lambda: all_arrive("bench", timeout=60)))

    times = common.alternate({"export": export, "file": file, "handshake": handshake}, args.rounds, args.warmup, sync=dist.barrier,
                             reduce_max=True)
    if common.rank() == 0:
        got, want = results["export"][-1][0], results["file"][-1][0]
        same = sorted(got) == sorted(k.removeprefix("base_model.model.") for k in want) and all(
            torch.equal(got[k.removeprefix("base_model.model.")], v) for k, v in want.items())
        rows = []
        summary = {}
        for name in ("export", "file", "handshake"):
            peak = max(p for _, p in results[name][args.warmup:])
            median = sorted(times[name])[len(times[name]) // 2]
            summary[name] = {"median_s": median, "peak_extra_mib": common.mib(peak)}
            rows.append([name, median, common.mib(peak)])
        common.show(["path", "median s", "peak extra MiB (rank 0)"], rows,
                    f"{args.size}: adapter {common.mib(adapter_bytes):.2f} MiB, TP={tp}, equal bit for bit: {same}")
        common.write_json(args.json, {"size": args.size, "adapter_mib": common.mib(adapter_bytes), "equal": same,
                                      "results": summary, "times": times}, args)
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
