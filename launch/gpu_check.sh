#!/usr/bin/env bash
# The one-GPU check (see launch/gpu_check.py): a ~1B random Llama fine-tuned by dist-lora train
# (bf16, SDPA, megatron with recompute none and full, and FSDP2) and by transformers + PEFT,
# throughput side by side, and PEFT's logits with the released adapter against the megatron model's.
#   bash launch/gpu_check.sh OUT_DIR [extra gpu_check.py options]
# Needs one NVIDIA GPU with torch (CUDA), megatron-core, transformers, peft and dist_lora
# importable (PYTHONPATH=. works from a source tree); no network. Under 8 minutes on an H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash launch/gpu_check.sh OUT_DIR [options]}"
shift
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" launch/gpu_check.py "$OUT" "$@"
