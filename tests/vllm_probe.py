"""Load PEFT adapter directories with vLLM's own adapter code and write what it makes of them.

Run in a subprocess by tests/test_serving_vllm.py (vLLM's import sets environment variables,
registers torch ops and configures logging; none of that may leak into the test process):

    python tests/vllm_probe.py SIDE_DIR REQUEST_JSON OUT_DIR

SIDE_DIR holds vLLM installed without its dependencies (plus the few it needs to import; see
launch/setup_vllm_side.sh); it is appended to sys.path, so torch is the test environment's.
REQUEST_JSON: ``{"targets": [...], "adapters": {name: [dir, max_lora_rank]}}``. For each
adapter, vLLM's ``PEFTHelper.from_local_dir`` + ``validate_legal(LoRAConfig(max_lora_rank))``
and ``LoRAModel.from_local_checkpoint(device="cpu")``; OUT_DIR/result.json gets per adapter
``{"error": message or None, "modules": {name: [rank, scaling]}}`` and OUT_DIR/NAME.safetensors
the delta vLLM applies per module, ``scaling · lora_b @ lora_a`` ([out, in], fp64, from its
own lora_a [r, in] / lora_b [out, r] and scaling).
"""

from __future__ import annotations

import json
import os
import sys

IMPORT_FAILED = 3  # exit status: vLLM (or a module it needs) does not import from SIDE_DIR


def probe(adapter_dir: str, targets: set[str], max_lora_rank: int):
    import torch
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    try:
        helper = PEFTHelper.from_local_dir(adapter_dir, max_position_embeddings=None)
        helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))
        model = LoRAModel.from_local_checkpoint(
            adapter_dir, targets, helper, lora_model_id=1, device="cpu", dtype=torch.float32
        )
    except ValueError as e:  # vLLM's refusals are ValueErrors
        return str(e), {}, {}
    deltas = {name: (w.lora_b.double() @ w.lora_a.double()) * w.scaling for name, w in model.loras.items()}
    return None, {name: [w.rank, w.scaling] for name, w in model.loras.items()}, deltas


def main(side_dir: str, request_path: str, out_dir: str) -> None:
    sys.path.append(side_dir)
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"  # vLLM's CPU platform (else it pins memory and needs CUDA)
    try:
        import vllm
        from vllm.lora.lora_model import LoRAModel  # noqa: F401
    except ImportError as e:
        print(f"vLLM does not import: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(IMPORT_FAILED)
    from safetensors.torch import save_file

    request = json.load(open(request_path))
    results = {}
    for name, (adapter_dir, max_lora_rank) in request["adapters"].items():
        error, modules, deltas = probe(adapter_dir, set(request["targets"]), max_lora_rank)
        results[name] = {"error": error, "modules": modules}
        if deltas:
            save_file({k: v.contiguous() for k, v in deltas.items()}, os.path.join(out_dir, f"{name}.safetensors"))

    from vllm.lora.peft_helper import PEFTHelper

    patterns = hasattr(PEFTHelper, "get_rank_and_scaling")  # per-module rank/alpha (vLLM >= 0.32)
    json.dump({"vllm": vllm.__version__, "patterns": patterns, "adapters": results},
              open(os.path.join(out_dir, "result.json"), "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
