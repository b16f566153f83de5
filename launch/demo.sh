#!/usr/bin/env bash
# The main job: set up the environment (first run only), then `dist-lora demo`: LoRA on the
# built-in tiny model, TP=2 over 2 CPU processes, ending in a consolidated PEFT adapter that
# the real PEFT loads. Arguments go to `dist-lora demo` (e.g. --out DIR, train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
exec .venv/bin/dist-lora demo "$@"
