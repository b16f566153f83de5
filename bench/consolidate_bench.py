"""Peak memory and throughput of ``dist-lora consolidate`` on a synthetic sharded checkpoint.

Writes a checkpoint laid out exactly as ``save_sharded`` writes one (Llama-3-8B-like geometry by
default: hidden 4096, 32 heads in 8 query groups, FFN 14336; LoRA on qkv/proj/fc1/fc2 at TP=4),
then in fresh subprocesses measures

* consolidate (format peft, with the HF config check; also without checksum verification),
* a plain safetensors baseline: ``load_file`` every shard, ``save_file`` all tensors at once
  (same bytes in and out, no mapping), also with an fsync of the output as consolidate does,

reporting the best wall time of --repeats runs, MB/s and the (worst) peak resident memory
during the call (VmHWM after resetting it through /proc/self/clear_refs, minus the resident
memory before the call) next to the adapter size; page cache warm. Usage::

    python bench/consolidate_bench.py [--layers 16] [--rank 64] [--tp 4] [--dtype float32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _child(mode: str, ckpt: str, out: str, hf: str) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    import torch  # noqa: F401  (imports before the baseline)
    from safetensors.torch import load_file, save_file

    from dist_lora.release.consolidate import consolidate
    import transformers  # noqa: F401

    if mode.startswith("warm-"):  # import transformers' model code and build the meta model once first
        from dist_lora.release.hf_model import hf_modules

        hf_modules(hf)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    if mode.startswith("baseline"):
        manifest = json.load(open(os.path.join(ckpt, "manifest.json")))
        tensors = {}
        for name in manifest["files"]:
            for key, tensor in load_file(os.path.join(ckpt, name)).items():
                tensors[f"{name}:{key}"] = tensor
        os.makedirs(out, exist_ok=True)
        save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
        del tensors
        if mode == "baseline-fsync":  # consolidate makes its output durable before the rename
            with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
                os.fsync(f.fileno())
    elif mode.endswith("megatron"):
        consolidate(ckpt, out, format="megatron", show_progress=False, verify=not mode.startswith("noverify"))
    else:
        consolidate(ckpt, out, hf_model_dir=hf, show_progress=False, verify=not mode.startswith("noverify"))
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_delta": _status("VmHWM") - before}))


def make_checkpoint(directory: str, layers: int, rank: int, tp: int, dtype: str, hidden: int = 4096,
                    heads: int = 32, groups: int = 8, ffn: int = 14336) -> tuple[str, str, int]:
    """A sharded checkpoint as save_sharded writes it, plus an HF config dir; returns
    (checkpoint dir, hf dir, adapter bytes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from dist_lora import LoraConfig
    from dist_lora.checkpoint.manifest import FORMAT, sha256_file, shard_file_name
    from dist_lora.checkpoint.pieces import shard_pieces
    from dist_lora.parallel.tp import set_tp_attributes

    ckpt, hf = os.path.join(directory, "ckpt"), os.path.join(directory, "hf")
    os.makedirs(ckpt), os.makedirs(hf)
    head_dim = hidden // heads
    qkv_rows = (heads + 2 * groups) * head_dim
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    files = {(0, t): ({}, {}) for t in range(tp)}  # tp rank -> (tensors, manifest entries)
    total = 0

    def add(t: int, key: str, shape, dim: int | None = None, stride: int = 1) -> None:
        """TP rank ``t``'s local tensor ``key`` (sharded along ``dim``, or replicated), written as
        save_sharded writes it (:func:`dist_lora.checkpoint.pieces.shard_pieces`)."""
        nonlocal total
        local = torch.randn(shape, generator=gen).to(torch_dtype)
        if dim is not None:
            set_tp_attributes(local, dim, stride)
        tensors, entries = files[(0, t)]
        for file_key, piece, entry in shard_pieces(key, local, local, t, tp):
            tensors[file_key], entries[file_key] = piece, entry
        total += local.numel() * local.element_size()

    for layer in range(layers):
        prefix = f"decoder.layers.{layer}."
        for sub, n_in, n_out, kind in (
            ("self_attention.linear_qkv", hidden, qkv_rows, "column"),
            ("self_attention.linear_proj", heads * head_dim, hidden, "row"),
            ("mlp.linear_fc1", hidden, 2 * ffn, "gated"),
            ("mlp.linear_fc2", ffn, hidden, "row"),
        ):
            a, b = f"{prefix}{sub}.lora_A.weight", f"{prefix}{sub}.lora_B.weight"
            if kind == "row":  # A sharded by columns, B replicated (written by TP rank 0)
                for t in range(tp):
                    add(t, a, (rank, n_in // tp), dim=1)
                add(0, b, (n_out, rank))
            else:  # A replicated, B sharded by rows (stride 2 for [gate; up])
                add(0, a, (rank, n_in))
                for t in range(tp):
                    add(t, b, (n_out // tp, rank), dim=0, stride=2 if kind == "gated" else 1)
    manifest = {"format": FORMAT, "adapter_name": "default", "layout": {"tp": tp, "pp": 1, "world": tp}, "files": {}}
    for (pp, t), (tensors, entries) in files.items():
        name = shard_file_name("shard", pp, t)
        save_file(tensors, os.path.join(ckpt, name), metadata={"format": "pt"})
        manifest["files"][name] = {"sha256": sha256_file(os.path.join(ckpt, name)), "tensors": entries}
    config_path = LoraConfig(r=rank, lora_alpha=2 * rank).save_pretrained(ckpt)
    manifest["config"] = {os.path.basename(config_path): {"sha256": sha256_file(config_path)}}
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=groups, vocab_size=32000)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(hf)
    return ckpt, hf, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (best time, worst peak)")
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "CKPT", "OUT", "HF"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    work = args.dir or tempfile.mkdtemp(prefix="consolidate-bench-")
    ckpt, hf, size = make_checkpoint(work, args.layers, args.rank, args.tp, args.dtype)
    for name in os.listdir(ckpt):  # warm the page cache: both contenders read cached files
        with open(os.path.join(ckpt, name), "rb") as f:
            while f.read(1 << 24):
                pass
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results: dict[str, dict] = {}
    modes = ("baseline", "baseline-fsync", "peft", "noverify-peft", "warm-peft", "warm-noverify-peft",
             "noverify-megatron")
    for repeat in range(args.repeats):  # interleaved; the best time and the worst peak of each mode
        for mode in modes:
            out = os.path.join(work, f"out-{mode}")
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # start every run with no dirty pages from the previous one
            line = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", mode, ckpt, out, hf],
                env=env, check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            r = json.loads(line)
            r["out_bytes"] = os.path.getsize(os.path.join(out, "adapter_model.safetensors"))
            best = results.setdefault(mode, r)
            best["seconds"] = min(best["seconds"], r["seconds"])
            best["peak_delta"] = max(best["peak_delta"], r["peak_delta"])
    mb = size / 2**20
    largest = 2 * 14336 * args.rank * (4 if args.dtype == "float32" else 2)  # fc1 B
    print(f"adapter: {mb:.1f} MiB ({args.layers} layers, r={args.rank}, TP={args.tp}, {args.dtype}); "
          f"largest tensor {largest / 2**20:.1f} MiB (fc1 B)")
    print("mode (warm-: transformers model code imported and meta model built before the measurement; "
          "noverify-: no sha256 pass)")
    base = results["baseline"]["seconds"]
    for mode, r in results.items():
        print(f"{mode:20s} {r['seconds']:6.2f} s  in {mb / r['seconds']:7.1f} MiB/s  "
              f"out {r['out_bytes'] / 2**20:6.1f} MiB  "
              f"peak RSS +{r['peak_delta'] / 2**20:6.1f} MiB ({r['peak_delta'] / size:.2f} x adapter)  "
              f"speed vs baseline {base / r['seconds']:.2f}")


if __name__ == "__main__":
    main()
