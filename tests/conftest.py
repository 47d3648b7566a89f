"""Suite-wide set-up: Triton's interpreter on a host without CUDA, and test times as they happen.

On a host without CUDA, Triton kernels can only run in its interpreter, and `@triton.jit` decides
interpreted-or-compiled when the kernel module is first imported. Whichever test happens to import
`kernels` first would otherwise fix that choice for the whole session, so it is fixed here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


TIMES_ENV = "TTTLA_TEST_TIMES"


def pytest_runtest_logreport(report) -> None:
    """With TTTLA_TEST_TIMES=FILE, append each test phase's time to FILE the moment it ends
    (seconds, phase, outcome, test id; tab-separated). `--durations` prints only when the session
    ends, so a GPU run stopped by its time limit would otherwise keep no times at all, and the times
    are what decides which cases leave `make test-gpu` for `make test-gpu-slow`. Under pytest-xdist the
    controller receives every worker's reports, so only it writes (a worker writing too doubles each line)."""
    path = os.environ.get(TIMES_ENV)
    if path and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as times:
            times.write(f"{report.duration:.2f}\t{report.when}\t{report.outcome}\t{report.nodeid}\n")
