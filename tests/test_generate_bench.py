"""The decode benchmark's smoke run: the TTT state keeps its size across contexts, the KV cache grows."""

from __future__ import annotations

import json

import torch

import benchmarks.decode as decode_bench
from benchmarks.decode import main
from benchmarks.profiling import host_summary, kernel_summary
from model.baseline import BaselineLM


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


def test_where_the_cache_does_not_fit_the_models_meet_at_the_largest_batch_it_fits(tmp_path, monkeypatch) -> None:
    """A transformer whose cache fits at most 2 rows (out of memory above, as a long context's does on
    a GPU): its row records batch 2 as the largest fit, and the TTT rows are timed at batch 2 too."""
    timed = decode_bench.time_batch

    def limited(model, batch, *args, **kwargs):
        if isinstance(model, BaselineLM) and batch > 2:
            return {"out_of_memory": True}
        return timed(model, batch, *args, **kwargs)

    monkeypatch.setattr(decode_bench, "time_batch", limited)
    main(["--quick", "--variants", "parallel", "--contexts", "64", "--prefill-up-to", "0", "--throughput-batch", "8",
          "--out", str(tmp_path / "decode")])  # fmt: skip
    rows = {row["model"]: row for row in json.loads((tmp_path / "decode.json").read_text())["rows"]}
    base, ttt = rows["sdpa-kv-cache"], rows["ttt-parallel"]
    assert base["throughput"] == {"out_of_memory": True} and base["throughput_largest_fit"]["batch"] == 2
    assert ttt["throughput"]["batch"] == 8 and ttt["throughput_at_baseline_batch"]["batch"] == 2
    ratio = ttt["throughput_at_baseline_batch"]["tokens_per_s"] / base["throughput_largest_fit"]["tokens_per_s"]
    line = next(line for line in (tmp_path / "decode.md").read_text().splitlines() if "fits at most batch 2" in line)
    assert line.endswith(f"at that batch ttt-parallel {ttt['throughput_at_baseline_batch']['tokens_per_s']:.0f} "
                         f"tokens/s ({ratio:.1f}x).")


def test_prefill_breakdown_lists_wall_time_beside_kernel_time() -> None:
    rows = [{"model": "ttt-parallel", "context": 4096, "prefill_ms": 35.04,
             "prefill_kernels": {"kernels": 812, "kernel_ms": 9.51, "top_kernels": []}},
            {"model": "sdpa-kv-cache", "context": 1048576}]  # fmt: skip
    lines = decode_bench.prefill_breakdown(rows)
    assert lines[-1] == "* ttt-parallel at 4096: 35.0 ms, 812 kernels taking 9.5 ms"
    assert len(lines) == 3 and decode_bench.prefill_breakdown(rows[1:]) == []


def test_host_summary_ranks_the_operators_by_their_own_host_time() -> None:
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def run() -> None:
        for _ in range(3):
            torch.mm(a, b)
        a.add(1.0)

    summary = host_summary(run, torch.device("cpu"))
    ops = {op["name"]: op for op in summary["top_host_ops"]}
    assert ops["aten::mm"]["count"] == 3 and ops["aten::add"]["count"] == 1
    assert summary["top_host_ops"][0]["name"] == "aten::mm"  # three 256^3 products outweigh one add
    assert summary["host_ms"] >= sum(op["self_us"] for op in summary["top_host_ops"]) / 1e3 * 0.999


def test_prefill_breakdown_names_where_the_host_time_goes() -> None:
    row = {"model": "ttt-parallel", "context": 4096, "prefill_ms": 25.9,
           "prefill_kernels": {"kernels": 964, "kernel_ms": 6.4, "top_kernels": []},
           "prefill_host": {"host_ms": 20.0, "top_host_ops": [{"name": "tttla::chunk_scan", "count": 12, "self_us": 6100.0},
                                                              {"name": "aten::copy_", "count": 90, "self_us": 900.0}]}}  # fmt: skip
    assert decode_bench.prefill_breakdown([row])[-1] == (
        "* ttt-parallel at 4096: 25.9 ms, 964 kernels taking 6.4 ms; most host time: tttla::chunk_scan 6.1 ms (12x), "
        "aten::copy_ 0.9 ms (90x)")


def test_the_chunk_gradient_modes_are_listed_where_both_were_timed() -> None:
    """A TTT row timed both ways at the throughput batch gets one line: pending tokens against running
    sums, tokens/s and the chunk-completing (max) step of each; a row timed one way gets none."""
    both = {"model": "ttt-parallel", "context": 4096,
            "throughput": {"tokens_per_s": 22000.0, "max_ms": 9.5},
            "throughput_running_sums": {"tokens_per_s": 18000.0, "max_ms": 4.25}}  # fmt: skip
    one = {"model": "ttt-recurrent", "context": 4096, "throughput": {"tokens_per_s": 15000.0, "max_ms": 5.0}}
    lines = decode_bench.chunk_gradient_modes([both, one])
    assert lines[-1] == ("* ttt-parallel at 4096: pending tokens 22000 tokens/s (max step 9.50 ms), "
                         "running sums 18000 (max 4.25 ms): 1.22x")
    assert len(lines) == 3 and decode_bench.chunk_gradient_modes([one]) == []
