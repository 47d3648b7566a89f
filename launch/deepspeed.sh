#!/usr/bin/env bash
# The `deepspeed` launcher over a hostfile (lines "host slots=8"; passwordless ssh between hosts):
#   HOSTFILE=hostfile launch/deepspeed.sh configs/train/760m_16k.yaml train.resume=auto
# Without HOSTFILE it runs on this node's GPUs. Rank and world come from the environment the
# launcher sets; the --local_rank argument it appends is accepted and ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSPEED=${DEEPSPEED:-.venv/bin/deepspeed}
hosts=()
if [ -n "${HOSTFILE:-}" ]; then hosts=(--hostfile "$HOSTFILE"); fi
exec "$DEEPSPEED" "${hosts[@]}" --master_port "${MASTER_PORT:-29500}" --module train "$@"
