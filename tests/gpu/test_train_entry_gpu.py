"""The trainer through its real entry point on the GPU: `python -m train.job.launch ... -m train CONFIG`.

A 4-layer model of the 125M shape trains a few steps on the built-in corpus with the blocks compiled
(`train.compile=true`, no activation checkpointing), bf16 and ZeRO, with gradient accumulation, a
logging step (the learning-rate and state-norm probes) every step, an evaluation step and a
checkpoint. This is what a user runs; it caught what the model-level tests could not: ZeRO's flat
parameter buffer left parameters of later layers off a 16-byte boundary, and the one compiled graph
that every layer shares read them with a misaligned vector load; and a probe that kept per-layer
Python state made Dynamo recompile once per layer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.multiprocess import REPO, small_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SEQ_LEN = 4096
STEPS = 4


def train_through_launcher(
    run_dir: Path, corpus: Path, zero_stage: int, seq_len: int = SEQ_LEN, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    overrides = [
        f"data.path={corpus}", f"data.seq_len={seq_len}", "model.num_layers=4", f"zero.stage={zero_stage}",
        f"train.steps={STEPS}", "train.grad_accum=2", "train.warmup_steps=2", "train.compile=true",
        "train.activation_checkpointing=false", "train.precision=bf16", f"logging.run_dir={run_dir}",
        "logging.log_every=1", "eval.every=2", "eval.batches=1", "eval.bucket_size=1024", f"checkpoint.every={STEPS}", *extra,
    ]  # fmt: skip
    command = [sys.executable, "-m", "train.job.launch", "--standalone", "--nproc_per_node=1", "-m", "train",
               "configs/train/125m_16k.yaml", *overrides]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if torch.cuda.is_available() else "cpu", "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def check_run(run: subprocess.CompletedProcess, run_dir: Path) -> None:
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["applied"] for r in records), records
    scalars = tensorboard_scalars(run_dir)
    rates = {tag: values for tag, values in scalars.items() if tag.startswith("ttt_lr/")}
    assert len(rates) == 3 * 4 and all(len(v) == STEPS and all(0 < x < 1 for x in v) for v in rates.values()), rates
    assert any(tag.startswith("eval/") for tag in scalars), sorted(scalars)
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "complete.json").is_file()
    # One graph for every layer; evaluation (no grad) may add one more. A probe or a guard that
    # differed per layer would recompile once per layer.
    recompiles = [line for line in output.splitlines() if "Recompiling function" in line]
    assert len(recompiles) <= 2, "\n".join(recompiles)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"), SEQ_LEN, val_fraction=0.2)


def test_compiled_zero2_training_runs_through_the_launcher(tmp_path, corpus):
    run_dir = tmp_path / "run"
    check_run(train_through_launcher(run_dir, corpus, zero_stage=2), run_dir)


@pytest.mark.gpu_slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_compiled_training_runs_through_the_launcher_with_other_zero_stages(tmp_path, corpus, zero_stage):
    run_dir = tmp_path / "run"
    check_run(train_through_launcher(run_dir, corpus, zero_stage), run_dir)
