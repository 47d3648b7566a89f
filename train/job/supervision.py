"""A supervised job: workers end with their launcher, and one job at a time uses a run directory.

torchrun starts every worker in a session of its own, so killing the launcher, or its whole process
group, does not reach the workers: they would go on training and saving beside the next job started
on the same run directory. A worker started by a launcher therefore watches its parent process. When
the parent is gone (the worker has been re-parented), the worker sends itself SIGTERM, which the
training loop answers like a preemption: every rank finishes the step, saves and returns. Should
that not end the process within `LAUNCHER_GONE_GRACE_S` (a rank blocked in a collective whose peer
is gone, or the signal arriving before the loop runs), the worker exits outright.

Rank 0 holds `<run_dir>/run.lock` for the whole run: a JSON record of its PID, host and start time,
created exclusively. A run directory the lock created is removed with it when the run left nothing
else there (it failed its start-up checks). A second job on the same run directory is refused at once, naming that PID. A
lock whose PID no longer runs on this host is stale (its job was killed) and is taken over with a
warning; a lock from another host cannot be checked from here and is refused with its path, to be
deleted by hand once that job is known to be gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from train.job.cli import warn
from train.job.errors import RunError, describe_os_error

LAUNCHER_GONE_GRACE_S = 60.0
LAUNCHER_POLL_S = 0.5
LOCK_FILE = "run.lock"

_watched_launcher: Optional[int] = None


def end_with_launcher(poll_s: float = LAUNCHER_POLL_S, grace_s: float = LAUNCHER_GONE_GRACE_S) -> None:
    """Stop this worker (save, then exit) once its launcher, the current parent process, is gone.

    Idempotent: one watchdog thread per process, on the parent seen at the first call.
    """
    global _watched_launcher
    if _watched_launcher is not None:
        return
    _watched_launcher = os.getppid()
    threading.Thread(target=_watch, args=(_watched_launcher, poll_s, grace_s), name="launcher-watchdog", daemon=True).start()


def _watch(launcher: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == launcher:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)
    try:
        print(
            f"warning: the launcher (PID {launcher}) is gone; worker {os.getpid()} saves and stops "
            f"(or exits in {grace_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
    except OSError:  # the launcher held the other end of stderr
        pass
    time.sleep(grace_s)
    os._exit(1)


def _is_running(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class RunLock:
    """`<run_dir>/run.lock`, held by this process until `release()`."""

    path: Path
    created: list[Path] = field(default_factory=list)  # the folders taking the lock created, innermost first

    def release(self) -> None:
        """Remove the lock, and the folders its taking created if they are empty."""
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # the run wrote something there (or another job did)
                return


def missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Create `run_dir` and take its lock; raises RunError naming the job that holds it."""
    created = missing_folders(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"logging.run_dir={str(run_dir)!r} cannot be created: {describe_os_error(error)}") from error
    path = run_dir / LOCK_FILE
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _remove_stale_lock(path, record["host"], run_dir)
            continue
        except OSError as error:
            raise RunError(f"logging.run_dir={str(run_dir)!r} is not writable: {describe_os_error(error)}") from error
        with os.fdopen(descriptor, "w") as file:
            file.write(json.dumps(record) + "\n")
        return RunLock(path, created)
    raise RunError(f"logging.run_dir={str(run_dir)!r}: another job took {path} while this one started; stop it first")


def _remove_stale_lock(path: Path, host: str, run_dir: Path) -> None:
    """Remove the lock at `path` if its process is gone; otherwise raise RunError naming the holder."""
    try:
        holder = json.loads(path.read_text())
        pid, holder_host, started = int(holder["pid"]), str(holder["host"]), holder.get("started", "?")
    except (OSError, ValueError, KeyError, TypeError):
        holder = None  # written by a process killed mid-write
    if holder is not None and holder_host != host:
        raise RunError(
            f"logging.run_dir={str(run_dir)!r} is in use by PID {pid} on host {holder_host} (since {started}); "
            f"stop that job or use another logging.run_dir (delete {path} only once that job is gone)"
        )
    if holder is not None and _is_running(pid):
        raise RunError(
            f"logging.run_dir={str(run_dir)!r} is in use by PID {pid} (since {started}); "
            f"stop that job (kill {pid}) or use another logging.run_dir"
        )
    warn(f"{path}: taking over the lock of PID {pid if holder else '?'}, which is no longer running")
    path.unlink(missing_ok=True)
