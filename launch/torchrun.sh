#!/usr/bin/env bash
# Multi-node launch of `dist-lora train`. Run the same command on every node; the layout comes
# from the environment (a scheduler or you set it):
#
#   NNODES          number of nodes                          (default 1)
#   NODE_RANK       this node's index, 0 .. NNODES-1         (default 0)
#   MASTER_ADDR     address of node 0, reachable from all    (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node 0                (default 29500)
#   NPROC_PER_NODE  processes (GPUs) per node                (default: GPUs here, else 1)
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh --config configs/llama8b_tp8_bf16.yaml
#
# Backends: NCCL on GPUs, gloo on CPU (chosen automatically). Settings users commonly change:
#   NCCL_SOCKET_IFNAME=eth0 / GLOO_SOCKET_IFNAME=eth0   the network interface to use
#   NCCL_IB_DISABLE=1                                   no InfiniBand (e.g. on cloud TCP-only nodes)
#   NCCL_DEBUG=INFO                                     print what NCCL chose (rings, transports)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1                   fail fast instead of hanging on a dead peer
# Keep tensor parallelism inside a node (TP <= GPUs per node): its collectives are per layer.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$NPROC_PER_NODE" \
  --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
  -m dist_lora.cli train "$@"
