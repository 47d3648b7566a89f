"""The token-read benchmark's own check, on the CPU: every implementation it would time answers what the
torch form answers (the Triton kernel in the interpreter, tests/conftest.py)."""

from __future__ import annotations

import torch

from benchmarks.token_read import KERNEL_TILES, READ_STATE_ROWS, measure


def test_token_read_benchmark_checks_each_implementation_against_the_torch_form():
    (row,) = measure([19], heads=2, d=48, dh=40, device=torch.device("cpu"))  # two token blocks; tiles split d or cover it
    # the read kernel, with and without the key features, at its defaults and each state-row count; the step kernel per tile
    errors = {name: error for name, error in row.items() if name.endswith("_error")}
    assert errors.pop("torch_error") == 0.0 and len(errors) == 2 + len(READ_STATE_ROWS) + len(KERNEL_TILES), row
    assert all(error < 1e-5 for error in errors.values()), errors
    assert row["w1_mb"] == round(19 * 2 * 48 * 40 * 4 / 2**20, 2)
