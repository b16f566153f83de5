"""What the training job tells its user: rank-0 log lines, the data summary, throughput
(tokens/s, model FLOPs per token, MFU, peak device memory) and ``<out_dir>/summary.json``."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .flops import flops_per_token, mfu
from .io import atomic_write_text


def log(message: str) -> None:
    """One line on rank 0 (through tqdm, so that a progress bar stays intact)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(message)


def data_summary(stats: dict) -> str:
    dropped = f", {stats['overlong']} overlong dropped or truncated" if stats["overlong"] else ""
    skipped = f", {stats['skipped_invalid']} invalid skipped" if stats["skipped_invalid"] else ""
    return (f"data: {stats['samples']} {stats['format']} samples{dropped}{skipped}; "
            f"{stats['train_sequences']} packed sequences, {100 * stats['pad_fraction']:.1f}% padding")


def model_flops_per_token(arch: Any, seq_len: int, lora_params: int) -> int:
    """:func:`dist_lora.flops.flops_per_token` for a parsed HF architecture (bridges). A
    mixture of experts counts the experts a token visits: k experts of width I compute what one
    gated MLP of width k·I does (averaged over the layers, dense ones at their own width; the
    router's h·E is left out)."""
    ffn = arch.ffn_hidden_size
    if getattr(arch, "num_experts", 0):
        moe = sum(arch.moe_layers)
        active = arch.moe_router_topk * arch.moe_ffn_hidden_size
        ffn = (moe * active + (arch.num_layers - moe) * arch.ffn_hidden_size) // arch.num_layers
    return flops_per_token(arch.num_layers, arch.hidden_size, ffn, arch.num_attention_heads,
                           arch.num_query_groups, arch.head_dim, arch.vocab_size, seq_len, lora_params)


class Throughput:
    """Tokens/s since the start of the run, with FLOPs per token and MFU (``peak_tflops`` per device)."""

    def __init__(self, tokens_per_step: int, flops_per_token: int, peak_tflops: Optional[float], devices: int) -> None:
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_tflops, self.devices = peak_tflops, devices

    def figures(self, steps: int, seconds: float) -> dict:
        tokens_per_s = self.tokens_per_step * steps / max(seconds, 1e-9)
        return {
            "tokens_per_s": tokens_per_s,
            "model_flops_per_token": self.flops_per_token,
            "mfu": mfu(self.flops_per_token, tokens_per_s, self.peak_tflops, self.devices),
        }

    def postfix(self, steps: int, seconds: float) -> dict:
        f = self.figures(steps, seconds)
        out = {"tok_s": f"{f['tokens_per_s']:.0f}"}
        if f["mfu"] is not None:
            out["mfu"] = f"{100 * f['mfu']:.1f}%"
        return out


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """This rank's peak allocated device memory (GiB) on CUDA; None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def write_summary(out_dir: str, summary: dict) -> str:
    """``<out_dir>/summary.json`` (rank 0; JSON-able values only, atomically)."""
    path = os.path.join(out_dir, "summary.json")
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(path, json.dumps(summary, indent=2, default=str) + "\n")
    return path
