"""`benchmarks.window_attention`: the pair count its TFLOP/s rest on, and its CPU smoke run.

The timings need a GPU; the CPU checks the arithmetic against a brute-force count of the band mask,
and that every variant the sweep builds computes the model's window (forward: FlexAttention has no
CPU backward).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import window_attention
from model.swa import band_mask


@pytest.mark.parametrize("seq_len, window", [(1, 1), (7, 3), (16, 16), (37, 64), (100, 9)])
def test_window_pairs_count_the_band_mask(seq_len, window):
    positions = torch.arange(seq_len)
    assert window_attention.window_pairs(seq_len, window) == int(band_mask(positions, positions, window).sum())


def test_cpu_sweep_agrees_with_the_model_window(tmp_path):
    rows = window_attention.main(["--device", "cpu", "--seq-len", "256", "--window", "64", "--heads", "2",
                                  "--head-dim", "16", "--no-autotune", "--out", str(tmp_path / "w.json")])
    flex_rows = [row for row in rows if row["variant"].startswith("flex_window") and "error" not in row]
    assert len(flex_rows) >= 2
    assert all(row["max_deviation"] < 1e-5 for row in flex_rows)
    assert (tmp_path / "w.json").exists()
