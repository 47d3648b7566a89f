"""A supervised job: one job per run directory, and workers that end with their launcher.

`job` starts a long 2-process run under torchrun in a session of its own, waits until it trains,
starts a second job on the same run directory (refused at once, naming the PID holding the lock),
then kills the launcher's whole process group with SIGKILL as a user or a scheduler would. The
workers, which torchrun put in sessions of their own, must notice and be gone within seconds,
having saved a checkpoint on the way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.multiprocess import REPO, long_run_overrides, small_corpus, wait_until_training, worker_environment

LOCK_FILE = "run.lock"

WORKERS_GONE_WITHIN_S = 20.0  # watchdog poll (0.5 s) + finishing the step + saving the tiny model


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("supervision")
    data = small_corpus(root / "data", 64, val_fraction=0.1)
    run_dir = root / "run"
    overrides = long_run_overrides(data, run_dir)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    with open(root / "first.log", "w") as log:
        launcher = subprocess.Popen(
            [*command, "configs/train/tiny_cpu.yaml", *overrides], cwd=REPO, env=worker_environment(),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    workers = []
    try:
        wait_until_training(run_dir, launcher)
        workers = psutil.Process(launcher.pid).children()
        holder = json.loads((run_dir / LOCK_FILE).read_text())["pid"] if (run_dir / LOCK_FILE).is_file() else None
        second = subprocess.run(
            [sys.executable, "-m", "train", "configs/train/tiny_cpu.yaml", *overrides, "train.steps=2"],
            cwd=REPO, env=worker_environment(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        killed_at = time.monotonic()
        while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
            if time.monotonic() - killed_at > WORKERS_GONE_WITHIN_S:
                break
            time.sleep(0.2)
        return {
            "holder": holder,
            "second": second,
            "alive": [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE],
            "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")),
            "lock_left": (run_dir / LOCK_FILE).exists(),
        }
    finally:
        for process in [*workers, psutil.Process(launcher.pid)] if launcher.poll() is None else workers:
            if process.is_running():
                process.kill()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_job_on_the_run_dir_is_refused_naming_the_holder(job: dict) -> None:
    second = job["second"]
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        next(line for line in second.stderr.splitlines() if line.startswith("train: "))
    ]  # one line, no traceback
    assert f"is in use by PID {job['holder']}" in second.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_workers_stop_when_the_launcher_is_killed(job: dict) -> None:
    assert job["alive"] == []
    assert job["checkpoints"], "the workers save before they stop"
    assert not job["lock_left"]


def test_releasing_the_lock_removes_the_run_directory_it_created_if_empty(tmp_path: Path) -> None:
    from train.job.supervision import acquire_run_lock

    acquire_run_lock(tmp_path / "runs/first").release()
    assert not (tmp_path / "runs").exists()
    lock = acquire_run_lock(tmp_path / "runs/second")
    (tmp_path / "runs/second/config.yaml").write_text("")
    lock.release()
    assert (tmp_path / "runs/second/config.yaml").exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from train.job.supervision import acquire_run_lock

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # a PID that no longer runs
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": finished.pid, "host": os.uname().nodename, "started": "earlier"}))
    lock = acquire_run_lock(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of PID {finished.pid}, which is no longer running" in capsys.readouterr().out
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
