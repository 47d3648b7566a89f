"""A failed worker under train.job.launch ends the job with one line, not torchrun's report of ~30 lines.

The launch is `make train`'s own command (`make -n train`), run by the shell with 2 gloo workers on
a run whose training shard was deleted; make's own `Error 1` line, printed after any failing recipe,
is left out by running the command without make. The failure report itself is checked on
hand-made failures: a worker's recorded line, a worker that died without one, a worker that only
lost its peer, and workers that stopped on a signal.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from tests.multiprocess import REPO, small_corpus, worker_environment
from train.job.launch import failure_report


def make_train_command(*arguments: str) -> str:
    """The shell commands `make train ARGS=...` runs, as make prints them with -n."""
    args = " ".join(arguments)
    listed = subprocess.run(["make", "-n", "--no-print-directory", "train", f"PYTHON={sys.executable}", f"ARGS={args}"], cwd=REPO, capture_output=True, text=True, check=True)
    return listed.stdout


def deleted_training_shard(corpus: Path, folder: Path) -> Path:
    """A copy of `corpus` whose training shard is gone (index.json still lists it)."""
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True)
        (folder / split / "index.json").write_bytes((corpus / split / "index.json").read_bytes())
    (folder / "val/shard.00000.mds").write_bytes((corpus / "val/shard.00000.mds").read_bytes())
    (folder / "manifest.json").write_bytes((corpus / "manifest.json").read_bytes())
    return folder


@pytest.mark.slow
def test_make_train_reports_a_deleted_shard_in_one_line(tmp_path: Path) -> None:
    corpus = small_corpus(tmp_path / "corpus", 64, val_fraction=0.1)
    damaged = deleted_training_shard(corpus, tmp_path / "data")
    command = make_train_command(f"data.path={damaged}", "data.seq_len=64", f"logging.run_dir={tmp_path / 'run'}")
    finished = subprocess.run(["bash", "-c", command], cwd=REPO, env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [line for line in finished.stdout.splitlines() if line.strip()]
    assert finished.returncode == 1, finished.stdout
    assert len(lines) == 1, finished.stdout
    assert lines[0].startswith("train: ") and f"{damaged}/train/shard.00000.mds is missing" in lines[0], lines[0]


def failure(tmp_path: Path, local_rank: int, exitcode: int, message: str | None) -> ProcessFailure:
    """A worker's failure as torchrun's agent reads it, with `message` in its error file if given."""
    error_file = tmp_path / f"error_{local_rank}.json"
    if message is not None:
        error_file.write_text(json.dumps({"message": message, "timestamp": 0}))
    return ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file=str(error_file))


def test_ranks_that_failed_alike_give_one_line(tmp_path: Path) -> None:
    line = "train: data.path='d': shard d/train/shard.00000.mds is missing"
    error = ChildFailedError("train", {0: failure(tmp_path, 0, 1, line), 1: failure(tmp_path, 1, 1, line)})
    assert failure_report(error) == ([line], 1)


def test_a_rank_stopped_by_the_agent_does_not_hide_the_others_line(tmp_path: Path) -> None:
    line = "train (rank 1): /runs/x/metrics.jsonl: No space left on device; free space on that filesystem or write elsewhere"
    error = ChildFailedError("train", {0: failure(tmp_path, 0, -signal.SIGTERM, None), 1: failure(tmp_path, 1, 1, line)})
    assert failure_report(error) == ([line], 1)


def test_the_status_is_that_of_a_rank_that_exited_by_itself(tmp_path: Path) -> None:
    """Rank 0 left its line but was stopped by the agent before it exited: the status is rank 1's own."""
    line = "train: data.path='d': shard d/train/shard.00000.mds is missing"
    error = ChildFailedError("train", {0: failure(tmp_path, 0, -signal.SIGTERM, line), 1: failure(tmp_path, 1, 1, line)})
    assert failure_report(error) == ([line], 1)


def test_a_worker_without_a_message_is_named_with_its_exit(tmp_path: Path) -> None:
    error = ChildFailedError("train", {1: failure(tmp_path, 1, -signal.SIGABRT, None)})
    assert failure_report(error) == (["train: rank 1 failed with signal SIGABRT; its output is above"], 128 + signal.SIGABRT)


def test_a_rank_that_lost_its_peer_does_not_hide_the_peer_that_ended(tmp_path: Path) -> None:
    lost = "train (rank 0): another rank of the job is gone (Connection closed by peer [127.0.0.1]:51112); its own output says why"
    (tmp_path / "error_0.json").write_text(json.dumps({"message": lost, "timestamp": 0, "lost_peer": True}))
    rank_0 = ProcessFailure(local_rank=0, pid=1000, exitcode=1, error_file=str(tmp_path / "error_0.json"))
    error = ChildFailedError("train", {0: rank_0, 1: failure(tmp_path, 1, -signal.SIGKILL, None)})
    assert failure_report(error) == (["train: rank 1 failed with signal SIGKILL; its output is above"], 128 + signal.SIGKILL)


def test_workers_that_stopped_on_a_signal_get_no_line_and_keep_their_status(tmp_path: Path) -> None:
    error = ChildFailedError("train", {0: failure(tmp_path, 0, 128 + signal.SIGTERM, None), 1: failure(tmp_path, 1, -signal.SIGTERM, None)})
    assert failure_report(error) == ([], 128 + signal.SIGTERM)
