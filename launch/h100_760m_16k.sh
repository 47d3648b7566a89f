#!/usr/bin/env bash
# The 760M model at 16K context on one H100/H200, offline, in the parallel form (linear-attention chunk
# scan: W1 fast, no weight norm), blocks compiled, no activation checkpointing, bf16, ZeRO-2. Builds the
# built-in corpus for 16K sequences when missing. Extra arguments are config overrides:
#   launch/h100_760m_16k.sh train.steps=150 checkpoint.every=50
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -f data/stdlib_16k/manifest.json ]; then
  "$PYTHON" -m train.data.prepare --stdlib --out data/stdlib_16k --seq-len 16384
fi
exec "$PYTHON" -m train.job.launch --standalone --nproc_per_node=1 -m train configs/train/760m_16k.yaml \
  model.ttt.mode=linear_attention model.ttt.fast_weights=w1 model.ttt.weight_norm=false \
  train.activation_checkpointing=false train.grad_accum=8 logging.run_dir=runs/760m_16k_1gpu "$@"
