"""One clear line per failure for every command-line entry point.

An expected failure (a bad config key, a missing or damaged file, a full disk, a run directory in
use) ends the command with one line on stderr, `<command>: <what failed, naming the key, file or
path, and what to do>`, and exit status 1. Under a launcher only rank 0 prints failures the ranks
share (config errors and the failures they agreed on), so the line appears once; a failure of
another rank alone is printed by that rank. Anything else is a bug and keeps its traceback.
`--debug` on the command line, or TTTLA_DEBUG=1, shows the traceback of expected failures too.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from model.config import ConfigError
from train.errors import RunError, describe_os_error

DEBUG_FLAG = "--debug"
DEBUG_ENV = "TTTLA_DEBUG"
DEBUG_HELP = f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback of a failure"
EXPECTED_FAILURES = (ConfigError, RunError, OSError, ValueError)
SHARED_FAILURES = (ConfigError, RunError)  # raised alike on every rank
INTERRUPTED_STATUS = 128 + signal.SIGINT


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


def run_command(name: str, main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run `main(argv)`; an expected failure prints one line and exits with status 1."""
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    argv = [argument for argument in argv if argument != DEBUG_FLAG]
    try:
        main(argv)
    except EXPECTED_FAILURES as error:
        if debug:
            raise
        if is_main_process():
            print(f"{name}: {failure_message(error)}", file=sys.stderr, flush=True)
        elif not isinstance(error, SHARED_FAILURES):
            print(f"{name} (rank {rank()}): {failure_message(error)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        if is_main_process():
            print(f"{name}: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)
