#!/usr/bin/env bash
# LoRA fine-tuning of a Hugging Face model under DeepSpeed ZeRO (1, 2 or 3), one or many nodes.
#
#   bash launch/deepspeed.sh [--help] [TRAIN ARGS...]
#
# It runs the DeepSpeed launcher on `python -m dist_lora.deepspeed.train_hf TRAIN ARGS`
# (see `python -m dist_lora.deepspeed.train_hf --help`: --model, --data, --output, --steps,
# --save_every, --r, --lora_alpha, --target_modules, ...). Settings, from the environment:
#
#   DS_CONFIG    DeepSpeed JSON config   (default configs/zero3_gpu.json with CUDA, else
#                                         configs/zero3_cpu.json; zero1/zero2 variants exist)
#   HOSTFILE     MPI-style hostfile, one line per node: "<host> slots=<gpus>"
#                (see launch/hostfile.example). Unset: this node only.
#   NUM_GPUS     processes per node (default: every GPU; on CPU 1, set e.g. NUM_GPUS=2)
#   NUM_NODES    use the first N hosts of HOSTFILE (default: all)
#   MASTER_ADDR  address of the first host, reachable from all (default: DeepSpeed infers it)
#   MASTER_PORT  free TCP port on it (default 29500)
#   LAUNCHER     how the launcher reaches the other hosts: pdsh (default, passwordless ssh),
#                openmpi, mvapich, slurm (inside an allocation), impi
#   NO_SSH=1     no remote launch: run this script on every node yourself (same HOSTFILE), each with its own
#                NODE_RANK (0..N-1), the same MASTER_ADDR/MASTER_PORT, and NUM_NODES=N
#   PYTHON       interpreter (default .venv/bin/python)
#
# Examples:
#   NUM_GPUS=2 bash launch/deepspeed.sh --output out/tiny --steps 20            # CPU smoke run
#   HOSTFILE=launch/hostfile DS_CONFIG=configs/zero3_gpu.json \
#       bash launch/deepspeed.sh --model /models/llama-70b --data train.jsonl --output out/70b
#
# Each rank checks the config before deepspeed.initialize (dist_lora.deepspeed.check_ds_config): an
# offload_optimizer or fused Adam on an install without the prebuilt op is refused with what to
# change (pass --allow_jit to let DeepSpeed compile it). Every rank calls save_pretrained; rank 0
# writes one full PEFT adapter (adapter_model.safetensors + adapter_config.json) to --output.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_CUDA" = 1 ]; then
  DS_CONFIG="${DS_CONFIG:-configs/zero3_gpu.json}"
else
  DS_CONFIG="${DS_CONFIG:-configs/zero3_cpu.json}"
  export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator, gloo collectives
  NUM_GPUS="${NUM_GPUS:-1}"
fi
ARGS=(--master_port "${MASTER_PORT:-29500}" --no_ssh_check)
[ -n "${HOSTFILE:-}" ] && ARGS+=(--hostfile "$HOSTFILE")
[ -n "${NUM_GPUS:-}" ] && ARGS+=(--num_gpus "$NUM_GPUS")
[ -n "${NUM_NODES:-}" ] && ARGS+=(--num_nodes "$NUM_NODES")
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
[ -n "${LAUNCHER:-}" ] && ARGS+=(--launcher "$LAUNCHER")
if [ "${NO_SSH:-0}" = 1 ]; then
  ARGS+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH=1 needs NODE_RANK}")
fi
exec "$PYTHON" -m deepspeed.launcher.runner "${ARGS[@]}" \
  --module dist_lora.deepspeed.train_hf --deepspeed_config "$DS_CONFIG" "$@"
