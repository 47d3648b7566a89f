"""`python -m benchmarks.sequence_parallel --quick` runs end to end on two CPU processes and writes its table."""

from __future__ import annotations

import json

import pytest

from tests.multiprocess import run_torchrun

COLUMNS = ["impl", "sp", "dp", "T_total", "T_per_rank", "layer_fwdbwd_ms", "step_ms", "comm_ms", "comm_frac",
           "bytes_per_layer", "max_context", "device"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_writes_every_column(tmp_path):
    run_torchrun(["-m", "benchmarks.sequence_parallel", "--quick", "--iters", "1", "--out", str(tmp_path)], processes=2, timeout=280)
    rows = json.loads((tmp_path / "sp.json").read_text())
    assert all(list(entry) == COLUMNS for entry in rows)
    assert {entry["impl"] for entry in rows} == {"parallel", "recurrent", "recurrent_ring"}
    assert (tmp_path / "sp.md").read_text().startswith("| impl |")
