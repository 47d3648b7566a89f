"""Damaged checkpoints and failed saves, on 2 CPU processes (gloo) with the real engine.

One torchrun launch (this file run as a script) plays the scenarios in-process, as
tests/test_checkpoint_resume.py does; the pytest side asserts on what rank 0 recorded.

`fallback`: a straight run of 8 steps checkpoints every 2 steps. Then the three newest checkpoints
are damaged as seen in the field: step 8 gets an empty complete.json, step 6 an empty
rank_00000.pt, step 4 a truncated ZeRO shard of rank 1. `train.resume=auto` must set all three
aside, resume from step 2 and repeat steps 3-8 bit for bit, logging each step once.

`disk_full`: the save at step 4 fails with ENOSPC on rank 1 only (simulated). Both ranks must stop
with one message naming the path, and a later resume must load step 2.

`all_damaged`: then every checkpoint of that run is damaged. `train.resume=auto` must set them all
aside and stop, naming them and how to start afresh on purpose, rather than train from step 0 over
the run's metrics; a second attempt, finding only checkpoints set aside, must stop the same way.
"""

from __future__ import annotations

import errno
import gc
import json
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.multiprocess import REPO, end_distributed, run_torchrun, small_corpus

STEPS = 8


def overrides(data: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        f"data.path={data}", "data.seq_len=64", "train.micro_batch_size=2", f"train.steps={steps}",
        "train.warmup_steps=2", "train.lr=3e-3", "zero.stage=2", "zero.bucket_size=100000",
        f"logging.run_dir={run_dir}", "logging.log_every=1", "logging.tensorboard=false", "eval.every=0",
        "checkpoint.every=2", "checkpoint.keep_last=4", "model.hidden_size=64", "model.num_attn_heads=2",
        "model.window_size=16", "model.ttt.chunk_size=16",
    ]  # fmt: skip


def logged(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def damage(checkpoints: Path) -> None:
    (checkpoints / "step_00000008/complete.json").write_text("")
    (checkpoints / "step_00000006/rank_00000.pt").write_bytes(b"")
    shard = checkpoints / "step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])


def run_scenarios(data: Path, out: Path) -> None:
    """The torchrun side; rank 0 writes out/results.json."""
    import torch.distributed as dist

    import train.checkpoint as checkpoint_module
    from train.config import load_run_config
    from train.job.errors import RunError
    from train.generation.export import consolidated_state_dict
    from train.loop import train

    config = REPO / "configs/train/tiny_cpu.yaml"

    def run(run_dir: Path, *extra: str, steps: int = STEPS):
        result = train(load_run_config(config, overrides(data, run_dir, steps) + list(extra)))
        gc.collect()  # release the streaming dataset's shared memory before the next run
        return result

    results: dict = {}
    fallback = out / "fallback"
    straight = run(fallback)
    if dist.get_rank() == 0:
        results["straight_losses"] = logged(fallback)
        straight_weights = consolidated_state_dict(straight.checkpoint)
        damage(fallback / "checkpoints")
    dist.barrier()
    resumed = run(fallback, "train.resume=auto")
    if dist.get_rank() == 0:
        resumed_weights = consolidated_state_dict(resumed.checkpoint)
        results["resumed_logged"] = logged(fallback)
        results["max_weight_diff"] = max((straight_weights[k] - resumed_weights[k]).abs().max().item() for k in straight_weights)
        results["folders"] = sorted(p.name for p in (fallback / "checkpoints").iterdir() if p.name.startswith("step_"))

    full = out / "disk_full"
    write_rank_state = checkpoint_module.write_rank_state

    def full_disk_on_rank_1(path: Path, state: dict) -> None:
        if "step_00000004" in str(path) and dist.get_rank() == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_rank_state(path, state)

    checkpoint_module.write_rank_state = full_disk_on_rank_1
    try:
        run(full, steps=4)
        save_error = None
    except RunError as error:
        save_error = str(error)
    finally:
        checkpoint_module.write_rank_state = write_rank_state
    gc.collect()
    after = run(full, "train.resume=auto", steps=4)
    if dist.get_rank() == 0:
        results["disk_full"] = {"error": save_error, "resumed_to": after.step, "logged_steps": [s for s, _ in logged(full)]}
        for folder in (full / "checkpoints").glob("step_*"):
            (folder / "complete.json").write_text("")
    dist.barrier()
    results["all_damaged"] = {"refusals": [refusal(lambda: run(full, "train.resume=auto", steps=6)) for _ in range(2)]}
    if dist.get_rank() == 0:
        results["all_damaged"]["logged_steps"] = [s for s, _ in logged(full)]
        results["all_damaged"]["folders"] = sorted(p.name for p in (full / "checkpoints").glob("step_*"))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    end_distributed()


def refusal(start: Callable[[], object]) -> str | None:
    """The message of the RunError `start()` raises, None if it runs."""
    from train.job.errors import RunError

    try:
        start()
    except RunError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    root = tmp_path_factory.mktemp("recovery")
    data = small_corpus(root / "data", 64, val_fraction=0.1)
    stdout = run_torchrun([__file__, str(data), str(root)], processes=2, timeout=300)
    return json.loads((root / "results.json").read_text()), stdout, root


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_damaged_newest_checkpoints_fall_back_bit_for_bit(launched: tuple[dict, str, Path]) -> None:
    results, stdout, _ = launched
    straight = dict(results["straight_losses"])
    resumed = results["resumed_logged"]
    assert [step for step, _ in resumed] == list(range(1, STEPS + 1))  # every step logged once
    # Exact equality: the same fp32 CPU arithmetic on the same samples in the same order.
    assert dict(resumed) == straight
    assert results["max_weight_diff"] == 0.0
    assert "resumed from" in stdout and "step_00000002 at step 2" in stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fallback_names_each_rejected_checkpoint_and_why(launched: tuple[dict, str, Path]) -> None:
    _, stdout, _ = launched
    for step, why in [(8, "complete.json is not valid JSON"), (6, "rank_00000.pt is 0 bytes"), (4, "zero_pp_rank_1_mp_rank_00_optim_states.pt is 1000 bytes")]:
        line = next(line for line in stdout.splitlines() if f"step_{step:08d} is damaged" in line)
        assert why in line and f"step_{step:08d}.damaged" in line


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_damaged_checkpoints_are_set_aside_not_deleted(launched: tuple[dict, str, Path]) -> None:
    results, _, _ = launched
    assert {"step_00000004.damaged", "step_00000006.damaged", "step_00000008.damaged"} <= set(results["folders"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_save_names_the_path_and_keeps_the_previous_checkpoint(launched: tuple[dict, str, Path]) -> None:
    results, _, root = launched
    r = results["disk_full"]
    assert r["error"] is not None
    assert "No space left on device" in r["error"] and ".staging-step_00000004/rank_00001.pt" in r["error"]
    assert f"{root}/disk_full/checkpoints/step_00000002 is intact" in r["error"]
    assert not (root / "disk_full/checkpoints/.staging-step_00000004").exists()
    assert r["resumed_to"] == 4 and r["logged_steps"] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_with_every_checkpoint_damaged_resume_stops_instead_of_starting_over(launched: tuple[dict, str, Path]) -> None:
    results, _, root = launched
    r = results["all_damaged"]
    for refusal in r["refusals"]:
        assert refusal is not None, "train.resume=auto started from step 0"
        assert f"no usable checkpoint in {root}/disk_full/checkpoints" in refusal
        assert "step_00000002.damaged, step_00000004.damaged" in refusal and "train.resume=none" in refusal
    assert r["logged_steps"] == [1, 2, 3, 4]  # the run's history is kept
    assert r["folders"] == ["step_00000002.damaged", "step_00000004.damaged"]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    run_scenarios(Path(sys.argv[1]), Path(sys.argv[2]))
