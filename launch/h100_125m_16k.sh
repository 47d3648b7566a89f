#!/usr/bin/env bash
# The 125M model at 16K context on one H100/H200, offline: builds the built-in corpus for 16K
# sequences when missing, then trains. Extra arguments are config overrides:
#   launch/h100_125m_16k.sh train.steps=150 checkpoint.every=50
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -f data/stdlib_16k/manifest.json ]; then
  "$PYTHON" -m train.data.prepare --stdlib --out data/stdlib_16k --seq-len 16384
fi
exec "$PYTHON" -m train.job.launch --standalone --nproc_per_node=1 -m train configs/train/125m_16k.yaml "$@"
