"""The training-step benchmark's ceiling columns (`benchmarks.components`, `step.add_ceilings`) and its rows.

The timings need a GPU; what the CPU can check is that the branch timed alone is the mixer's own
TTT branch, and that the ceiling is the formula the benchmark states.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import step
from benchmarks.compiler_options import inductor_options
from benchmarks.components import ceiling, ttt_branch
from model.config import LMConfig, TTTConfig
from model.layers import shared_rotary_tables
from model.ttt_layer import TTTMixer


def test_ttt_branch_is_what_the_mixer_adds_before_its_output_projection():
    """Mixer output = o_proj(branch + window attention): with the window removed, o_proj(branch) alone."""
    torch.manual_seed(0)
    cfg = LMConfig(hidden_size=32, num_layers=1, num_attn_heads=2, window_size=0, ttt=TTTConfig(num_heads=2, chunk_size=8))
    mixer = TTTMixer(cfg).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    q, k, v = mixer.qkv(x).chunk(3, dim=-1)
    rope = shared_rotary_tables(torch.arange(19), 16, cfg.rope_theta, x.dtype)  # as the benchmark times it
    expected, _ = mixer(x)
    for tables in (None, rope):
        branch = ttt_branch(mixer, x, q, k, v, tables)
        torch.testing.assert_close(mixer.o_proj(branch.reshape(2, 19, 32)), expected, rtol=1e-12, atol=1e-12)


def test_ceiling_replaces_attention_by_the_window_and_the_branch():
    assert ceiling(100.0, {"attention_ms": 40.0, "window_ms": 10.0, "ttt_branch_ms": 20.0}) == pytest.approx(100 / 90)


def test_ceiling_columns_go_on_the_tttla_rows_without_recomputation(monkeypatch):
    parts = {"attention_ms": 50.0, "window_ms": 5.0, "ttt_branch_ms": 15.0}
    monkeypatch.setattr("benchmarks.components.mixer_parts_ms", lambda cfg, batch, seq_len: parts)
    common = dict(config="125m", T=16384, B=1, compile=True, peak_gib=1.0, mfu=0.1, mfu_spec=0.08)
    rows = [dict(impl="tttla", checkpointing="none", tok_s=150, step_ms=10.0, **common),
            dict(impl="sdpa", checkpointing="none", tok_s=100, step_ms=100.0, **common),
            dict(impl="tttla", checkpointing="full", tok_s=120, step_ms=12.0, **common),
            dict(impl="sdpa", checkpointing="full", tok_s=90, step_ms=110.0, **common)]  # fmt: skip
    step.add_ratios(rows)
    step.add_ceilings(rows)
    assert rows[0]["ceiling"] == pytest.approx(100 / 70, abs=0.01)
    assert rows[0]["of_ceiling"] == pytest.approx(1.5 / 1.43, abs=0.01)
    assert "ceiling" not in rows[1] and "ceiling" not in rows[2]
    table = step.markdown(rows, (700.0, 989.0), ["cmd"], "GPU")
    tttla_line = next(line for line in table.splitlines() if line.startswith("| tttla | 125m | 16384 x 1 | none"))
    assert tttla_line.endswith("| 50.0 / 5.0 / 15.0 | 1.43x | 105% |"), tttla_line


def test_also_with_measures_each_tttla_row_again_right_after_it(monkeypatch) -> None:
    """`--also-with` A/Bs one setting within the process: each tttla row is followed by its twin with
    the extra overrides; the transformer and the released layer are measured once."""
    calls = []

    def fake_row(impl, size, seq_len, batch, checkpointing, compile_on, peaks, warmup, steps, overrides, budget, profile,
                 inductor, skip_guards):
        calls.append((impl, seq_len, overrides))
        return {"impl": impl, "config": " ".join([size, *overrides]), "T": seq_len}

    monkeypatch.setattr(step, "measure_row", fake_row)
    args = argparse.Namespace(configs=["125m"], seqs=["16384x1", "65536x1"], checkpointing=["none"],
                              impls=["tttla", "sdpa"], compile="on", warmup=1, steps=1, memory_budget=1.0,
                              model_overrides=["ttt.chunk_size=1024"], also_with=["window_kernel=triton"],
                              profile=False, inductor=[], skip_guards=False)  # fmt: skip
    step.measure_all(args, (700.0, 989.0))
    base, twin = ("ttt.chunk_size=1024",), ("ttt.chunk_size=1024", "window_kernel=triton")
    assert calls == [("tttla", 16384, base), ("tttla", 16384, twin), ("sdpa", 16384, base),
                     ("tttla", 65536, base), ("tttla", 65536, twin), ("sdpa", 65536, base)]  # fmt: skip
    args.also_with = []
    calls.clear()
    step.measure_all(args, (700.0, 989.0))
    assert [c[2] for c in calls] == [base] * 4


def test_profiled_rows_list_their_device_time_against_the_wall_time() -> None:
    """A profiled row says how much of its step the kernels take (host-bound when far below 100 %);
    rows without a profile add nothing to the table."""
    common = dict(config="125m", B=1, checkpointing="none", compile=True, peak_gib=1.0, mfu=0.1, mfu_spec=0.08)
    rows = [dict(impl="tttla", T=16384, tok_s=150, step_ms=80.0, kernels=2400, kernel_ms=60.0, **common),
            dict(impl="sdpa", T=16384, tok_s=100, step_ms=100.0, **common)]  # fmt: skip
    table = step.markdown(rows, (700.0, 989.0), ["cmd"], "GPU")
    assert table.splitlines()[-1] == "* tttla 125m 16384 x 1: 2400 kernels, 60.0 ms of 80.0 ms (75%)"
    assert "profiled step" not in step.markdown(rows[1:], (700.0, 989.0), ["cmd"], "GPU")
    rows[0]["host"] = {"top_host_ops": [{"name": "tttla::chunk_scan", "count": 12, "self_us": 4800.0}]}
    assert step.markdown(rows, (700.0, 989.0), ["cmd"], "GPU").splitlines()[-1].endswith(
        "(75%); most host time: tttla::chunk_scan 4.8 ms (12x)")


def test_skipped_guards_start_after_one_compiling_step_and_end_with_the_row() -> None:
    """`--skip-guards` stops Dynamo's guard checks only once a step has compiled its graphs, and only
    for the row: afterwards guards are checked again (a later row's graphs compile as usual)."""
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")
    calls = []

    def one_step() -> None:
        calls.append(compiled(torch.ones(3)))

    def skipping() -> bool:
        return torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe

    with step.guard_stance(one_step, skip=True):
        assert len(calls) == 1 and skipping()
        one_step()
    assert torch.equal(calls[1], torch.full((3,), 3.0)) and not skipping()
    with step.guard_stance(one_step, skip=False):
        assert len(calls) == 2 and not skipping()


def test_inductor_options_are_read_as_python_literals() -> None:
    options = inductor_options(["cpp_wrapper=True", "max_autotune_gemm_backends=TRITON", "combo_kernels_autotune=2"])
    assert options == {"cpp_wrapper": True, "max_autotune_gemm_backends": "TRITON", "combo_kernels_autotune": 2}
