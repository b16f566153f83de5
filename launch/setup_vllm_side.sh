#!/usr/bin/env bash
# Install vLLM WITHOUT its dependencies (plus the few pure-Python / small packages its adapter
# code needs to import) into a side directory, used only by tests/test_serving_vllm.py to check
# the `--for vllm` release against vLLM's own PEFTHelper / LoRAModel. Never into .venv (vLLM's
# own requirements would replace torch). Measured: ~50 s, ~630 MB (239 MB vLLM wheel).
# Versions are pinned: a newer vLLM may import something else. Idempotent; installs into a
# temporary directory first, so an interrupted install is not mistaken for a complete one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DIST_LORA_VENV:-.venv}"
SIDE="${DIST_LORA_VLLM_SIDE_DIR:-.venv-side/vllm}"
VLLM=0.34.0
DEPS=(  # what `import vllm.lora.lora_model` needs beyond .venv (found one ModuleNotFoundError at a time)
  pyzmq==27.3.0 urllib3==2.8.0 requests==2.34.2 certifi==2026.10.19.post1
  aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 aiohappyeyeballs==2.7.1
  aiosignal==1.4.0 frozenlist==1.8.0 pillow==13.0.0 pybase64==1.5.1 cachetools==8.0.2 cbor2==6.3.0
  msgspec==0.23.0 cloudpickle==3.1.3 uvloop==0.23.0 prometheus-client==0.26.0 llguidance==1.9.1
  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
)
if [ -d "$SIDE/vllm-$VLLM.dist-info" ]; then
  echo "[setup] vLLM $VLLM side install ready: $SIDE"
  exit 0
fi
echo "[setup] installing vLLM $VLLM without dependencies into $SIDE (tests only)"
tmp="$SIDE.partial"
rm -rf "$tmp" && mkdir -p "$(dirname "$SIDE")"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" \
  "vllm==$VLLM" "${DEPS[@]}" 2> >(grep -v "^WARNING: Location" >&2)
rm -rf "$SIDE" && mv "$tmp" "$SIDE"
echo "[setup] vLLM $VLLM side install ready: $SIDE"
