"""``dist-lora demo``: the main job end to end on this machine.

1. create the built-in tiny Llama-family model (random weights, saved as an HF checkpoint);
2. fine-tune LoRA on the built-in corpus with torchrun, tensor parallel over 2 CPU processes;
3. consolidate the sharded checkpoint into one PEFT adapter (done by the training job);
4. load that adapter with the real PEFT onto the HF model and compare its logits with the
   megatron model's on a held-out batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .tiny_model import builtin_model_dir

DEMO_CONFIG = str(Path(__file__).parent / "configs" / "demo.yaml")
TOLERANCE = 1e-4


def run_demo(out: str, nproc: int = 2, overrides: list[str] | None = None) -> int:
    hf_dir = builtin_model_dir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "dist_lora.cli", "train", "--config", DEMO_CONFIG,
        f"model.hf_dir={hf_dir}", f"train.out_dir={out}", f"parallel.tp={nproc}", *(overrides or []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    code = subprocess.call(command, env=env)
    if code != 0:
        return code
    return verify(out, hf_dir)


def verify(out: str, hf_dir: str) -> int:
    """Load the consolidated adapter with the real PEFT and compare logits with megatron's."""
    import torch
    from safetensors.torch import load_file

    try:
        from peft import PeftModel
    except ImportError:
        print("peft is not installed: skipping the PEFT check (pip install peft).")
        return 0
    from transformers import AutoModelForCausalLM

    adapter = os.path.join(out, "adapter")
    probe = load_file(os.path.join(out, "probe_logits.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), adapter)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe["tokens"]).logits
    diff = (logits - probe["logits"]).abs().max().item()
    ok = diff < TOLERANCE
    print(f"PEFT on the HF model vs the megatron TP model, max |logits difference| = {diff:.2e} "
          f"({'OK' if ok else 'FAILED'}, tolerance {TOLERANCE:g})")
    print(f"base model:          {hf_dir}")
    print(f"sharded checkpoints: {os.path.abspath(os.path.join(out, 'checkpoints'))}")
    print(f"PEFT adapter:        {os.path.abspath(adapter)}")
    return 0 if ok else 1
