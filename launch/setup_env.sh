#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with everything the demo and
# the tests need. torch is installed FIRST and pinned: a loose torch requirement (or
# megatron-core installed first) would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DIST_LORA_VENV:-.venv}"
PY="${PYTHON:-python3}"
TORCH_SPEC="${DIST_LORA_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC (first, so nothing else picks a CUDA build)"
  "${PIP[@]}" "$TORCH_SPEC" 2> >(grep -v "^WARNING: Location" >&2)
fi
if ! "$VENV/bin/python" -c "import dist_lora, megatron.core, peft, deepspeed, pytest, datasets" >/dev/null 2>&1; then
  echo "[setup] installing dist-lora with its dev/test extras"
  "${PIP[@]}" -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
fi
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia'; then
  echo "[setup] warning: CUDA packages were installed into $VENV" >&2
fi
if [ "${DIST_LORA_VLLM_SIDE:-0}" = "1" ]; then  # opt-in: vLLM's adapter code for tests/test_serving_vllm.py
  bash launch/setup_vllm_side.sh
fi
echo "[setup] environment ready: $VENV"
