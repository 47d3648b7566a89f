"""TTTLA_TEST_TIMES (tests/conftest.py): every test phase's time is written as soon as it ends."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.multiprocess import REPO

CASE = "tests/test_structure.py::test_functions_fit_in_sixty_lines"


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_each_phase_is_written_when_it_ends(tmp_path, workers):
    """Once per phase, also where pytest-xdist workers run the tests (`make test-gpu`)."""
    times = tmp_path / "times.tsv"
    env = {**os.environ, "TTTLA_TEST_TIMES": str(times)}
    finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers, CASE], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert finished.returncode == 0, finished.stdout[-2000:]
    rows = [line.split("\t") for line in times.read_text().splitlines()]
    assert [(phase, outcome, test) for _, phase, outcome, test in rows] == [
        ("setup", "passed", CASE), ("call", "passed", CASE), ("teardown", "passed", CASE)]
    assert all(float(seconds) >= 0 for seconds, *_ in rows)
