"""Checkpoint/resume and non-finite-step handling, on 2 CPU processes (gloo) with the real engine.

One torchrun launch (this file run as a script) plays every scenario in-process, because starting
DeepSpeed costs more than the tiny training itself; each scenario builds a fresh engine, model and
loader, so what carries over between "runs" is only what the checkpoint holds. The pytest side
prepares a small corpus, launches the workers once and asserts on what they recorded.

Scenarios per ZeRO stage 1, 2, 3: `straight` trains 2N = 6 steps; `killed` trains the same config
but sends itself SIGTERM after step N = 3 (the preemption path saves and returns) and `resumed`
continues it with train.resume=auto to step 6. Resume must be bit-for-bit: identical per-step
losses (fp32 on CPU, deterministic kernels, same sample order) and identical consolidated weights.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest

from tests.multiprocess import REPO, end_distributed, run_torchrun, small_corpus

STEPS, KILL_AT = 6, 3
STAGES = (1, 2, 3)


def scenario_overrides(data: Path, run_dir: Path, stage: int) -> list[str]:
    return [
        f"data.path={data}", "data.seq_len=64", "train.micro_batch_size=2", f"train.steps={STEPS}",
        "train.warmup_steps=2", "train.lr=3e-3", f"zero.stage={stage}", "zero.bucket_size=100000",
        f"logging.run_dir={run_dir}", "logging.log_every=1", "logging.tensorboard=false",
        "checkpoint.every=100", "checkpoint.keep_last=3", "model.hidden_size=64", "model.num_attn_heads=2",
        "model.window_size=16", "model.ttt.chunk_size=16",
    ]  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"])]


def run_scenarios(data: Path, out: Path) -> None:
    """The torchrun side: every scenario, results of rank 0 written to out/results.json."""
    import torch.distributed as dist

    from train.config import load_run_config
    from train.generation.export import consolidated_state_dict, export_checkpoint, load_model
    from train.loop import NonFiniteLossError, train

    config = REPO / "configs/train/tiny_cpu.yaml"
    results: dict = {}

    def run(run_dir: Path, stage: int, *extra: str):
        result = train(load_run_config(config, scenario_overrides(data, run_dir, stage) + list(extra)))
        gc.collect()  # release the streaming dataset's shared memory before the next scenario
        return result

    for stage in STAGES:
        base = out / f"zero{stage}"
        straight = run(base / "straight", stage)
        killed = run(base / "resumed", stage, f"debug.signal_at_step={KILL_AT}")
        resumed = run(base / "resumed", stage, "train.resume=auto")
        if dist.get_rank() == 0:
            a, b = consolidated_state_dict(straight.checkpoint), consolidated_state_dict(resumed.checkpoint)
            results[f"zero{stage}"] = {
                "killed_at": killed.step, "killed_preempted": killed.preempted, "resumed_at": resumed.step,
                "straight_losses": losses(base / "straight"), "resumed_losses": losses(base / "resumed"),
                "same_keys": sorted(a) == sorted(b),
                "max_weight_diff": max((a[k] - b[k]).abs().max().item() for k in a),
            }  # fmt: skip
            exported, _ = load_model(export_checkpoint(straight.checkpoint.parent, out / f"export{stage}"))
            results[f"zero{stage}"]["export_max_diff"] = max(
                (exported.state_dict()[k] - a[k]).abs().max().item() for k in a
            )

    skip_dir = out / "skip_one"
    run(skip_dir, 2, "train.steps=4", "debug.nonfinite_loss_steps=[2]")
    streak_dir = out / "streak"
    try:
        run(streak_dir, 2, "checkpoint.every=1", "debug.nonfinite_loss_steps=[3,4]", "train.max_nonfinite_steps=2")
        streak_error = None
    except NonFiniteLossError as error:
        streak_error = str(error)
    gc.collect()
    if dist.get_rank() == 0:
        records = [json.loads(line) for line in (skip_dir / "metrics.jsonl").read_text().splitlines()]
        results["skip_one"] = {"applied": [r["applied"] for r in records], "losses": [r["loss"] for r in records]}
        results["streak"] = {
            "error": streak_error,
            "checkpoints": sorted(p.name for p in (streak_dir / "checkpoints").glob("step_*")),
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
    end_distributed()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    data = small_corpus(root / "data", 64, val_fraction=0.1)
    run_torchrun([__file__, str(data), str(root)], processes=2, timeout=600)
    return json.loads((root / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", STAGES)
def test_kill_and_resume_is_bit_for_bit(results: dict, stage: int) -> None:
    r = results[f"zero{stage}"]
    assert r["killed_preempted"] and r["killed_at"] == KILL_AT
    assert r["resumed_at"] == STEPS
    assert len(r["resumed_losses"]) == STEPS
    # Exact equality, no tolerance: the same fp32 CPU arithmetic on the same samples in the same order.
    assert r["resumed_losses"] == r["straight_losses"]
    assert r["same_keys"] and r["max_weight_diff"] == 0.0
    assert r["straight_losses"][-1] < r["straight_losses"][0]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", STAGES)
def test_export_consolidates_the_sharded_checkpoint(results: dict, stage: int) -> None:
    # The exported fp32 model equals the consolidated ZeRO shards exactly (a copy, no arithmetic).
    assert results[f"zero{stage}"]["export_max_diff"] == 0.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nonfinite_step_is_skipped_and_training_continues(results: dict) -> None:
    r = results["skip_one"]
    assert r["applied"] == [True, False, True, True]
    assert r["losses"][1] != r["losses"][1]  # the injected NaN is what step 2 reported
    assert all(loss == loss for i, loss in enumerate(r["losses"]) if i != 1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nonfinite_streak_stops_and_keeps_last_good_checkpoint(results: dict) -> None:
    r = results["streak"]
    assert r["error"] is not None and "train.max_nonfinite_steps=2" in r["error"]
    assert "step_00000002" in r["error"]
    assert r["checkpoints"] == ["step_00000001", "step_00000002"]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    run_scenarios(Path(sys.argv[1]), Path(sys.argv[2]))
