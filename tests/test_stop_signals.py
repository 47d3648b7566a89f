"""Stopping a run by signal: it saves, says so in one line and exits with 128 + the signal's number.

A stop often reaches a worker twice: `kill -TERM` of the whole job (its process group, a systemd
unit, a scheduler's cancel) signals the launcher and the workers at once, and the launcher forwards
the signal to its workers again. That repeat must count once, however the two land against the
steps and the saves; only a signal well after the first interrupts. Two real jobs under
train.job.launch (`make train`'s launcher, 2 gloo workers) check the whole path: one stopped from
outside, launcher and workers at once while it saves every step, one whose workers signal
themselves (the launcher is not signalled and must pass their status on, adding nothing).

A worker whose collective fails because its peer is gone ends with one line, not the collective's
traceback; train.job.launch then names the peer that ended first (tests/test_launch.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.multiprocess import REPO, long_run_overrides, small_corpus, wait_until_training, worker_environment

LAUNCH = [sys.executable, "-m", "train.job.launch", "--standalone", "--nproc_per_node=2", "-m", "train", "configs/train/tiny_cpu.yaml"]
STOPPED_BY_SIGTERM = 128 + signal.SIGTERM
GLOO_LOST_PEER = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:51112. "
    "This is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error."
)


def deliver(*signums: int) -> None:
    """Send this process each signal in turn; each handler runs before the next is sent."""
    for signum in signums:
        os.kill(os.getpid(), signum)
        time.sleep(0.01)


def test_a_stop_signal_delivered_twice_counts_once() -> None:
    from train.loop import StopRequest

    stop = StopRequest()
    try:
        deliver(signal.SIGTERM, signal.SIGTERM)  # the job's own, then the launcher's forward of it
    finally:
        stop.restore()
    assert stop.requested and stop.signum == signal.SIGTERM


def test_a_stop_signal_after_the_repeat_window_interrupts() -> None:
    from train.loop import StopRequest

    stop = StopRequest(repeat_window_s=0.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT, signal.SIGINT)
    finally:
        stop.restore()


def test_a_rank_whose_peer_is_gone_ends_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from train.job.cli import ERROR_FILE_ENV, REPORTED_BY_LAUNCHER_ENV, run_command

    def collective_of_a_dead_peer(argv: list[str]) -> None:
        raise RuntimeError(GLOO_LOST_PEER)

    monkeypatch.delenv(REPORTED_BY_LAUNCHER_ENV, raising=False)
    monkeypatch.setenv(ERROR_FILE_ENV, str(tmp_path / "error.json"))
    with pytest.raises(SystemExit) as exit_info:
        run_command("train", collective_of_a_dead_peer, [])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "train (rank 0): another rank of the job is gone (Connection closed by peer [127.0.0.1]:51112); its own output says why"
    ]
    assert json.loads((tmp_path / "error.json").read_text())["lost_peer"] is True  # train.job.launch reads it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("stop") / "data", 64, val_fraction=0.1)


def shown_lines(output: str) -> list[str]:
    """The job's output less torchrun's banner about OMP_NUM_THREADS and library warnings."""
    return [line for line in output.splitlines() if line.strip() and not re.match(r"^(W\d{4} |\s|.*Warning)", line)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_whole_job_during_saves_saves_and_stops(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*long_run_overrides(corpus, run_dir), "checkpoint.every=1", "checkpoint.keep_last=2"]
    job = subprocess.Popen(
        [*LAUNCH, *overrides], cwd=REPO, env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until_training(run_dir, job)
        workers = psutil.Process(job.pid).children()
        for process in [job.pid, *(worker.pid for worker in workers)]:  # as `kill -TERM <launcher> <workers>` does
            os.kill(process, signal.SIGTERM)
        output, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == STOPPED_BY_SIGTERM, output
    lines = shown_lines(output)
    assert not any("Traceback" in line or "interrupted" in line for line in lines), output
    stopped = re.fullmatch(r"stopped by SIGTERM after step (\d+); resume with train.resume=auto", lines[-1])
    assert stopped, output
    assert (run_dir / f"checkpoints/step_{int(stopped.group(1)):08d}/complete.json").is_file()
    assert not list((run_dir / "checkpoints").glob(".staging-*"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_stopped_by_signal_exit_with_its_status(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*long_run_overrides(corpus, run_dir), "debug.signal_at_step=2"]
    finished = subprocess.run(
        [*LAUNCH, *overrides], cwd=REPO, env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=240,
    )  # fmt: skip
    assert finished.returncode == STOPPED_BY_SIGTERM, finished.stdout
    assert shown_lines(finished.stdout)[-2:] == [
        f"saved {run_dir}/checkpoints/step_00000002",
        "stopped by SIGTERM after step 2; resume with train.resume=auto",
    ]
