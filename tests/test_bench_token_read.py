"""The token-read benchmark's own check, on the CPU: every implementation it would time answers what the
torch form answers (the Triton kernel in the interpreter, tests/conftest.py)."""

from __future__ import annotations

import torch

from benchmarks.token_read import measure


def test_token_read_benchmark_checks_each_implementation_against_the_torch_form():
    (row,) = measure([3], heads=2, d=16, dh=24, device=torch.device("cpu"))
    assert row["torch_error"] == 0.0 and row["kernel_error"] < 1e-5, row
    assert row["w1_mb"] == round(3 * 2 * 16 * 24 * 4 / 2**20, 2)
