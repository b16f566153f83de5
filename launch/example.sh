#!/usr/bin/env bash
# Set up the environment (first run only) and run the tensor-parallel LoRA example on 2 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
exec .venv/bin/dist-lora example "$@"
