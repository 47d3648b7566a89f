#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 host> launch/multinode_torchrun.sh configs/train/760m_16k.yaml
# NODE_RANK may be omitted (the rendezvous assigns ranks); MASTER_PORT defaults to 29500.
# Checkpoints must live on a filesystem all nodes share (checkpoint.dir / logging.run_dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR to node 0}"
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
RDZV_ID=${RDZV_ID:-tttla-$(date +%Y%m%d)}
node_rank=()
if [ -n "${NODE_RANK:-}" ]; then node_rank=(--node_rank="$NODE_RANK"); fi
exec "$PYTHON" -m train.job.launch \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" "${node_rank[@]}" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="$RDZV_ID" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  -m train "$@"
