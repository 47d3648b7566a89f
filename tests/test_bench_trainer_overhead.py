"""benchmarks.trainer_overhead runs every variant on the CPU, the trainer's own step included."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.multiprocess import REPO, long_run_overrides, small_corpus, worker_environment


def test_every_variant_times_a_step(tmp_path):
    data = small_corpus(tmp_path / "data", 64, val_fraction=0.2)
    out = tmp_path / "rows.json"
    overrides = [o for o in long_run_overrides(data, tmp_path / "run") if not o.startswith("logging.")]
    command = [
        sys.executable, "-m", "benchmarks.trainer_overhead", "configs/train/tiny_cpu.yaml", *overrides,
        "train.grad_accum=2", "--steps", "1", "--rounds", "2", "--warmup", "0", "--out", str(out), "--profile", str(tmp_path / "profile"),
        "--engine-configs", "zero.stage=1,zero.overlap_comm=false",
    ]  # fmt: skip
    finished = subprocess.run(command, cwd=REPO, env=worker_environment(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    variants = ["model_step", "model", "model_bf16", "engine", "engine_data", "trainer", "engine[zero.stage=1,zero.overlap_comm=false]"]
    assert [row["variant"] for row in rows] == variants
    assert all(row["step_ms"] > 0 and row["tok_s"] > 0 and 0 < row["host_ms"] <= row["step_ms"] for row in rows), rows
    assert rows[0]["of_first"] == 1.0
    tables = [(tmp_path / "profile" / f"{name}.txt") for name in [*variants[:6], "engine_zero.stage_1_zero.overlap_comm_false_"]]
    assert all(table.read_text().count("aten::") > 5 for table in tables)


def test_sync_sites_name_each_synchronising_call_and_count_it(monkeypatch):
    """`--syncs` on the GPU: each synchronising-call warning is counted under the frames that raised
    it, and other warnings are not (the sync debug mode itself needs CUDA, so here the step raises
    the warning the mode would)."""
    import warnings

    import torch

    from benchmarks.trainer_overhead import sync_sites

    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def waits() -> None:
        warnings.warn("called a synchronizing CUDA operation")

    def step() -> None:
        for _ in range(2):
            waits()  # one site, twice
        warnings.warn("an unrelated warning")

    sites = sync_sites(step, torch.device("cpu"))
    assert sum(sites.values()) == 2 and len(sites) == 1, sites
    assert next(iter(sites)).startswith("test_bench_trainer_overhead.py:"), sites
    assert [frame.split(" ")[-1] for frame in next(iter(sites)).split(" <- ")] == ["waits", "step", "sync_sites"], sites
