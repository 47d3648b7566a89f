"""`python -m train.job.launch [torchrun options] -m train CONFIG ...`: torchrun, with one line per failure.

torchrun itself reports a failed worker with its agent's log lines, a traceback of its own and a
summary box of some 25 lines, after the worker has printed its own message: the cause ends up
buried. This launcher runs torchrun's agent in this process, with the same options, environment and
signal handling (SIGTERM and SIGINT stop the workers as under torchrun), so the workers' parent is
this process just as it is torchrun's. What changes is the report of a failure:

- each worker leaves its one-line message (train/job/cli.py) in the error file torchrun gives it
  (TORCHELASTIC_ERROR_FILE) instead of printing it; the launcher prints each distinct message once;
- a worker that left no message (a bug with its traceback above, a crash, a kill) is reported as
  `<entry point>: rank R failed with exit code C; its output is above`;
- a worker whose collective failed only because another worker was gone (its error file says
  `lost_peer`) is not reported while another worker's failure is: that one is the cause;
- workers that saved and stopped on a signal (exit status 128 + N, train/job/cli.py) need no report:
  their own lines said so, and the launcher exits with their status;
- the agent's lines about stopping and failed workers, and torchrun's summary, are not shown;
- the exit status is the failed worker's (128 + N for a worker ended by signal N).

Stopped by a signal, the launcher exits with 128 + N and adds nothing to the workers' own lines.
`--debug` anywhere on the command line (the workers receive it too), or TTTLA_DEBUG=1, runs
torchrun unchanged, summary and tracebacks included.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from train.job.cli import INTERRUPTED_STATUS, LOST_PEER_KEY, REPORTED_BY_LAUNCHER_ENV, debug_requested, stopped_status

# The agent's records of worker start, stop and failure: the launcher's own line replaces them.
WORKER_LIFECYCLE_LOGGERS = ("torch.distributed.elastic.multiprocessing", "torch.distributed.elastic.agent")
STOPPED_STATUSES = (stopped_status(signal.SIGTERM), stopped_status(signal.SIGINT))


class _HideWorkerLifecycle(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(WORKER_LIFECYCLE_LOGGERS)


def exit_status(failure: ProcessFailure) -> int:
    """The worker's exit code as a shell reports it: 128 + N for a worker ended by signal N."""
    return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode


def recorded_message(failure: ProcessFailure) -> str | None:
    """The one-line message a worker left in its error file (train/job/cli.py), if it left one.

    Without an error file torchrun fills in a placeholder message; a traceback recorded by
    torchrun's own `@record` is a structure, not a line.
    """
    if not os.path.isfile(failure.error_file):
        return None
    message = failure.error_file_data.get("message")
    return message if isinstance(message, str) and "\n" not in message else None


def lost_its_peer(failure: ProcessFailure) -> bool:
    """Whether the worker recorded that it failed only because another worker was gone (train/job/cli.py)."""
    return os.path.isfile(failure.error_file) and bool(failure.error_file_data.get(LOST_PEER_KEY))


def failure_report(error: ChildFailedError) -> tuple[list[str], int]:
    """(lines to print, exit status) for the failed workers of one node.

    Only the workers that failed by themselves count while there are any: not those whose collective
    broke because another worker was gone. Every distinct message they left is printed once, in rank
    order: ranks that failed alike leave the same line. Workers that stopped on a signal after saving
    get no line. Otherwise the first failure is named with its rank and exit code.
    """
    failures = [(rank, error.failures[rank]) for rank in sorted(error.failures)]
    causes = [(rank, failure) for rank, failure in failures if not lost_its_peer(failure)] or failures
    lines: list[str] = []
    reporting = []  # the failures that left a message, in rank order
    for _, failure in causes:
        message = recorded_message(failure)
        if message is not None:
            reporting.append(failure)
            if message not in lines:
                lines.append(message)
    stopped = [failure for _, failure in causes if failure.exitcode in STOPPED_STATUSES]
    if not lines and stopped:
        return [], stopped[0].exitcode
    # A rank that left its message may still have been stopped by torchrun (SIGTERM) before it
    # exited on its own: the status is that of a rank that exited by itself where there is one.
    first_rank, first = min(causes, key=lambda item: (item[1].timestamp, item[0]))
    exited = [f for f in reporting if f.exitcode > 0]
    status = exit_status((exited or reporting or [first])[0])
    if not lines:
        cause = f"signal {first.signal_name()}" if first.exitcode < 0 else f"exit code {first.exitcode}"
        lines.append(f"{error.name}: rank {first_rank} failed with {cause}; its output is above")
    return lines, status


def launch(argv: list[str]) -> int:
    """Run torchrun with `argv`, reporting a worker failure in one line per distinct message; the exit status."""
    for handler in logging.getLogger("torch.distributed").handlers:
        handler.addFilter(_HideWorkerLifecycle())
    args = torchrun.parse_args(argv)
    os.environ[REPORTED_BY_LAUNCHER_ENV] = "1"
    try:
        torchrun.run(args)
    except ChildFailedError as error:
        lines, status = failure_report(error)
        print("\n".join(lines), file=sys.stderr, flush=True)
        return status
    except SignalException as stop:
        return 128 + int(stop.sigval)
    except KeyboardInterrupt:  # Ctrl-C before the agent took over the signals
        return INTERRUPTED_STATUS
    return 0


if __name__ == "__main__":
    if debug_requested(sys.argv[1:]):
        torchrun.main()
    else:
        sys.exit(launch(sys.argv[1:]))
