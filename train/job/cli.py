"""One clear line per failure for every command-line entry point.

An expected failure (a bad config key, a missing or damaged file, a full disk, a run directory in
use) ends the command with one line on stderr, `<command>: <what failed, naming the key, file or
path, and what to do>`, and exit status 1. Under a launcher only rank 0 prints failures the ranks
share (config errors and the failures they agreed on), so the line appears once; a failure of
another rank alone is printed by that rank. Anything else is a bug and keeps its traceback.
`--debug` on the command line, or TTTLA_DEBUG=1, shows the traceback of expected failures too.

Under torchrun every failing rank also leaves its line in the error file torchrun names
(TORCHELASTIC_ERROR_FILE), where torchrun's failure summary shows it. Under train.job.launch, which
sets TTTLA_LAUNCHER=1, the ranks print nothing themselves: the launcher prints each distinct line
once, after torchrun has stopped every worker, so that a rank stopped by torchrun before it could
print cannot lose the message.

A rank whose collective failed because another rank's process is gone (killed, crashed) is not the
cause: it ends with one line saying so, not with the collective's traceback, and marks its error
file `lost_peer`, so that train.job.launch names the rank that ended instead.

Exit status: 0 when the command finished, 1 for an expected failure, 128 + N for a run that signal N
stopped after saving (SIGTERM: 143, SIGINT: 130), and 130 for one interrupted without saving.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Callable

from model.config import ConfigError
from train.job.errors import RunError, describe_os_error

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TTTLA_DEBUG"
REPORTED_BY_LAUNCHER_ENV = "TTTLA_LAUNCHER"
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
DEBUG_HELP = f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback of a failure"
EXPECTED_FAILURES = (ConfigError, RunError, OSError, ValueError)
SHARED_FAILURES = (ConfigError, RunError)  # raised alike on every rank
INTERRUPTED_STATUS = 128 + signal.SIGINT
LOST_PEER_KEY = "lost_peer"  # in a worker's error file: its failure is another rank's end, not its own
# What a collective raises where the process of another rank is gone: gloo's TCP pairs ("Connection
# closed by peer"), torch's own store and backend errors.
LOST_PEER_TEXTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
LOST_PEER_ERRORS = ("DistNetworkError", "DistBackendError")


def stopped_status(signum: int) -> int:
    """The exit status of a run stopped by signal `signum`, as a shell reports a process that signal ended."""
    return 128 + signum


class StoppedBySignal(Exception):
    """The run stopped early, as asked by signal `signum`, after saving; the command exits with 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def rank() -> int:
    """This process's global rank as the launcher set it (0 outside a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def warn(message: str) -> None:
    """A warning line, printed by rank 0 only."""
    if is_main_process():
        print(f"warning: {message}", flush=True)


def failure_message(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, RunError):
        return describe_os_error(error)
    return str(error)


def debug_requested(argv: list[str]) -> bool:
    """Whether failures keep their traceback (and train.job.launch shows torchrun's own report)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def is_lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective's failure because another rank's process is gone."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & set(LOST_PEER_ERRORS)) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in LOST_PEER_TEXTS)
    )


def record_failure(line: str, lost_peer: bool = False) -> None:
    """Leave `line` in this worker's torchrun error file, in the form torchrun reads back.

    Written aside and renamed: torchrun's agent fails outright on a half-written file.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        with open(f"{path}.partial", "w") as file:
            json.dump({"message": line, "timestamp": int(time.time()), LOST_PEER_KEY: lost_peer}, file)
        os.replace(f"{path}.partial", path)
    except OSError:  # the launcher then names the rank and its exit code instead
        pass


def report_failure(name: str, error: BaseException) -> None:
    """Print the failure's line (once per job, see the module's docstring) and record it for torchrun."""
    shared = isinstance(error, SHARED_FAILURES)
    where = "" if is_main_process() or shared else f" (rank {rank()})"
    line = f"{name}{where}: {failure_message(error)}"
    record_failure(line)
    if os.environ.get(REPORTED_BY_LAUNCHER_ENV) != "1" and (is_main_process() or not shared):
        print(line, file=sys.stderr, flush=True)


def report_lost_peer(name: str, error: BaseException) -> None:
    """One line for a rank whose collective failed because another rank ended; the launcher prefers that rank's report."""
    reason = str(error).split(". ")[0].split("] ")[-1]
    line = f"{name} (rank {rank()}): another rank of the job is gone ({reason}); its own output says why"
    record_failure(line, lost_peer=True)
    if os.environ.get(REPORTED_BY_LAUNCHER_ENV) != "1":
        print(line, file=sys.stderr, flush=True)


def run_command(name: str, main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run `main(argv)`; an expected failure prints one line and exits with status 1 (see the module's docstring)."""
    debug = debug_requested(argv)
    argv = [argument for argument in argv if argument != DEBUG_FLAG]
    try:
        main(argv)
    except StoppedBySignal as stop:
        sys.exit(stopped_status(stop.signum))
    except EXPECTED_FAILURES as error:
        if debug:
            raise
        report_failure(name, error)
        sys.exit(1)
    except RuntimeError as error:
        if debug or not is_lost_peer(error):
            raise
        report_lost_peer(name, error)
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        if is_main_process():
            print(f"{name}: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)
