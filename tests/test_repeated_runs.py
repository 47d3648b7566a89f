"""Runs that can be repeated and continued, on a corpus too small for the defaults.

A handful of short documents, prepared with the default 1% validation share, leaves the validation
split empty: `train.data.prepare` says so. `make train` then trains on it with the tiny config's
defaults (evaluation every 50 steps, 20 warmup steps) for 2 steps: evaluation turns itself off and
the warmup is clamped, each with a warning. Running `make train` again with more steps continues
the run from its checkpoint (the target resumes by default) instead of refusing it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiprocess import REPO, worker_environment

DOCUMENTS = 6


def make_train(run_dir: Path, data: Path, steps: int, extra: str = "") -> subprocess.CompletedProcess:
    arguments = (
        f"data.path={data} data.seq_len=64 train.micro_batch_size=2 train.steps={steps} logging.log_every=1 "
        f"checkpoint.every=100 logging.run_dir={run_dir} model.hidden_size=64 model.num_attn_heads=2 "
        f"model.window_size=16 model.ttt.chunk_size=16 {extra}"
    )
    command = ["make", "--no-print-directory", "train", f"PYTHON={sys.executable}", "NPROC=1", f"ARGS={arguments}"]
    return subprocess.run(command, cwd=REPO, env=worker_environment(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("repeated")
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(DOCUMENTS):
        (corpus / f"{index}.txt").write_text(f"document {index}: " + "the quick brown fox jumps over the lazy dog. " * 6)
    prepare = subprocess.run(
        [sys.executable, "-m", "train.data.prepare", str(corpus), "--out", str(root / "data"), "--seq-len", "64"],
        cwd=REPO, env=worker_environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    first = make_train(root / "run", root / "data", steps=2, extra="logging.profile_step=2")
    second = make_train(root / "run", root / "data", steps=4)
    records = [json.loads(line) for line in (root / "run/metrics.jsonl").read_text().splitlines()]
    profiles = sorted(path.name for path in (root / "run/profile").glob("*"))
    table = (root / "run/profile/step_00000002.txt").read_text() if profiles else ""
    return {"prepare": prepare, "first": first, "second": second, "steps": [r["step"] for r in records],
            "profiles": profiles, "profile_table": table}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prepare_warns_that_the_validation_split_is_empty(runs: dict) -> None:
    prepare = runs["prepare"]
    assert prepare.returncode == 0, prepare.stderr
    assert "warning: " in prepare.stdout and "/val holds no sample" in prepare.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_on_a_tiny_corpus_turns_evaluation_off_and_clamps_warmup(runs: dict) -> None:
    first = runs["first"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "evaluation is off for this run" in first.stdout
    assert "train.warmup_steps=20 is more than train.steps=2" in first.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_train_again_continues_the_run(runs: dict) -> None:
    second = runs["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step_00000002 at step 2" in second.stdout
    assert runs["steps"] == [1, 2, 3, 4]


def test_the_step_named_by_logging_profile_step_is_profiled(runs):
    """Only step 2 of the first run (`logging.profile_step=2`) leaves a trace and a table of its ops."""
    assert runs["profiles"] == ["step_00000002.json", "step_00000002.txt"]
    assert "aten::mm" in runs["profile_table"] and "profiled step 2" in runs["first"].stdout
