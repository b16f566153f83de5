#!/usr/bin/env bash
# The test command: create the environment if needed, then run the fast default suite.
# Extra arguments go to pytest (e.g. `-m slow` for the slow tests, `-k invariance`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest -q "$@"
