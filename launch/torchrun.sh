#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes):
#   launch/torchrun.sh configs/train/125m_16k.yaml train.lr=3e-4
# On a CPU-only host it runs gloo processes (DS_ACCELERATOR=cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if command -v nvidia-smi >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  export DS_ACCELERATOR=cpu
  NPROC=${NPROC:-2}
fi
exec "$PYTHON" -m train.job.launch --standalone --nproc_per_node="$NPROC" -m train "$@"
