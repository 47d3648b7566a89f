"""The decode benchmark's smoke run: the TTT state keeps its size across contexts, the KV cache grows."""

from __future__ import annotations

import json

from benchmarks.decode import kernel_summary, main


def test_quick_benchmark_shows_constant_state_against_a_growing_cache(tmp_path) -> None:
    main(["--quick", "--contexts", "64", "512", "--prefill-up-to", "64", "--out", str(tmp_path / "decode")])
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    sizes: dict[str, list[float]] = {}
    for row in rows:
        sizes.setdefault(row["model"], []).append(row["latency"]["state_mb"])
        assert row["throughput"]["tokens_per_s"] > 0 and row["latency"]["max_ms"] >= row["latency"]["median_ms"]
    assert rows[0]["prefill_tokens_per_s"] > 0  # 64 <= --prefill-up-to: prefilled and timed
    assert sizes["ttt-parallel"][0] == sizes["ttt-parallel"][1]
    assert sizes["ttt-recurrent"][0] == sizes["ttt-recurrent"][1]
    assert sizes["sdpa-kv-cache"][1] > 4 * sizes["sdpa-kv-cache"][0]
    assert (tmp_path / "decode.md").read_text().startswith("# Decode latency")


def test_kernel_summary_counts_and_ranks_the_kernels_of_a_step() -> None:
    launched = [("gemv", 3.0), ("triton_poi_fused_add", 1.0), ("gemv", 4.0), ("sdpa", 5.5)]
    summary = kernel_summary(launched)
    assert summary["kernels"] == 4 and abs(summary["kernel_ms"] - 0.0135) < 1e-12
    assert [(k["name"], k["count"], k["us"]) for k in summary["top_kernels"]] == [
        ("gemv", 2, 7.0), ("sdpa", 1, 5.5), ("triton_poi_fused_add", 1, 1.0)]
