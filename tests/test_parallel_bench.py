"""`python -m parallel.bench --quick` runs end to end on two CPU processes and writes its table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["impl", "sp", "dp", "T_total", "T_per_rank", "layer_fwdbwd_ms", "step_ms", "comm_ms", "comm_frac",
           "bytes_per_layer", "max_context", "device"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_writes_every_column(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "parallel.bench", "--quick", "--iters", "1", "--out", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert finished.returncode == 0, finished.stderr[-4000:]
    rows = json.loads((tmp_path / "sp.json").read_text())
    assert all(list(entry) == COLUMNS for entry in rows)
    assert {entry["impl"] for entry in rows} == {"parallel", "recurrent", "recurrent_ring"}
    assert (tmp_path / "sp.md").read_text().startswith("| impl |")
