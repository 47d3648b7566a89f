"""Perplexity by position during training: written every `eval.every` steps, the same with sp = 2 as with sp = 1.

Two real launches of the trainer (torchrun, gloo): one process, then two processes sharing each
sequence (parallel.sp=2). The evaluation is collective and gathers the per-position losses of the
sequence's slices, so both must report the same numbers for the same weights and data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.multiprocess import run_torchrun, small_corpus

# float32 on CPU; the split run sums its losses in another order and through a gather, so the
# two agree to rounding (~1e-7), far inside 1e-5, while any missing slice or double count is O(1).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("eval") / "data", 128, val_fraction=0.2)


def train_with_eval(corpus: Path, run_dir: Path, processes: int, sp: int) -> None:
    overrides = [
        f"data.path={corpus}", "data.seq_len=128", "train.steps=4", "train.warmup_steps=1",
        "train.micro_batch_size=2", "eval.every=2", "eval.batches=2", "eval.bucket_size=32",
        "logging.log_every=2", "checkpoint.every=100", f"parallel.sp={sp}", f"logging.run_dir={run_dir}",
    ]  # fmt: skip
    run_torchrun(["-m", "train", "configs/train/tiny_cpu.yaml", *overrides], processes=processes, timeout=300)


@pytest.fixture(scope="module")
def results(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    runs = {}
    for sp in (1, 2):
        runs[sp] = tmp_path_factory.mktemp(f"sp{sp}")
        train_with_eval(corpus, runs[sp], processes=sp, sp=sp)
    return runs


def read(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "eval" / f"ppl_by_position_step{step:08d}.json").read_text())


def test_evaluation_is_written_at_every_period_with_buckets(results):
    for step in (2, 4):
        result = read(results[1], step)
        assert [b["start"] for b in result["buckets"]] == [0, 32, 64, 96]
        assert (results[1] / "eval" / f"ppl_by_position_step{step:08d}.png").is_file()
    assert read(results[1], 4)["loss"] < read(results[1], 2)["loss"]  # training lowers held-out loss


def test_sequence_parallel_evaluation_equals_single_process(results):
    for step in (2, 4):
        single, split = read(results[1], step), read(results[2], step)
        assert split["tokens"] == single["tokens"]
        for a, b in zip(split["buckets"], single["buckets"]):
            assert abs(a["loss"] - b["loss"]) <= TOLERANCE * b["loss"]


def test_evaluation_reaches_tensorboard(results):
    from train.evaluation.plot_run import read_scalars

    scalars = read_scalars(results[1])
    assert [step for step, _ in scalars["eval/loss"]] == [2, 4]
