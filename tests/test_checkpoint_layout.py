"""Resume across a different dp x sp split of the same world: 4 CPU processes (gloo), the real engine.

`straight` trains N = 4 steps at parallel.sp=4 (dp = 1, two sequences per rank) and checkpoints
at step 2; `relaid` resumes that step-2 checkpoint at dp = 2 x parallel.sp=2 with one sequence
per rank, so both layouts read two sequences per step. ZeRO shards model and optimizer over the
whole world in both layouts, and streaming's global sample order does not depend on the number of
replicas, so steps 3 and 4 of the resumed run read the same samples from the same weights and
optimizer state as the straight run: they differ only in float32 summation order (how the
sequences are split across ranks). One torchrun launch plays both runs; the pytest side asserts.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest

from tests.multiprocess import REPO, end_distributed, run_torchrun, small_corpus

STEPS, RESUME_AT = 4, 2
# Float32 summation order alone: observed ~5e-8 (step 3) and ~1e-7 (step 4, after one AdamW step)
# relative, weights ~1e-7 apart. 1e-5 leaves two orders of margin; a wrong data position (say the
# epoch restarting) or lost optimizer state moves the loss by ~1e-2, the weights by ~lr = 3e-3.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


def overrides(data: Path, run_dir: Path, sp: int, micro_batch_size: int) -> list[str]:
    return [
        f"data.path={data}", "data.seq_len=64", f"train.micro_batch_size={micro_batch_size}", f"train.steps={STEPS}",
        "train.warmup_steps=2", "train.lr=3e-3", "zero.stage=2", "zero.bucket_size=100000", f"parallel.sp={sp}",
        f"logging.run_dir={run_dir}", "logging.log_every=1", "logging.tensorboard=false",
        f"checkpoint.every={RESUME_AT}", "checkpoint.keep_last=3", "model.hidden_size=64", "model.num_attn_heads=2",
        "model.window_size=16", "model.ttt.chunk_size=16", "model.ttt.momentum=true",
    ]  # fmt: skip


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def run_both_layouts(data: Path, out: Path) -> None:
    """The torchrun side: train at sp=4, resume at dp=2 x sp=2; rank 0 writes out/results.json."""
    import torch.distributed as dist

    from train.checkpoint import MARKER
    from train.config import load_run_config
    from train.generation.export import consolidated_state_dict
    from train.loop import train

    config = REPO / "configs/train/tiny_cpu.yaml"
    straight = train(load_run_config(config, overrides(data, out / "straight", sp=4, micro_batch_size=2)))
    gc.collect()  # release the streaming dataset's shared memory before the next run
    written = straight.checkpoint.parent / f"step_{RESUME_AT:08d}"
    relaid = train(load_run_config(config, overrides(data, out / "relaid", sp=2, micro_batch_size=1) + [f"train.resume={written}"]))
    gc.collect()
    if dist.get_rank() == 0:
        a, b = consolidated_state_dict(straight.checkpoint), consolidated_state_dict(relaid.checkpoint)
        results = {
            "marker": json.loads((written / MARKER).read_text()),
            "relaid_step": relaid.step,
            "straight_losses": losses(out / "straight"),
            "relaid_losses": losses(out / "relaid"),
            "max_weight_diff": max((a[k] - b[k]).abs().max().item() for k in a),
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
    end_distributed()


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    root = tmp_path_factory.mktemp("layout")
    data = small_corpus(root / "data", 64, val_fraction=0.1)
    stdout = run_torchrun([__file__, str(data), str(root)], processes=4, timeout=300)
    return json.loads((root / "results.json").read_text()), stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_records_its_layout(launched: tuple[dict, str]) -> None:
    results, _ = launched
    marker = results["marker"]
    assert {key: marker[key] for key in ("step", "world", "dp", "sp")} == {"step": RESUME_AT, "world": 4, "dp": 1, "sp": 4}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_at_another_layout_continues_the_same_training(launched: tuple[dict, str]) -> None:
    results, _ = launched
    straight, relaid = results["straight_losses"], results["relaid_losses"]
    assert results["relaid_step"] == STEPS
    assert sorted(relaid) == [str(step) for step in range(RESUME_AT + 1, STEPS + 1)]
    for step, loss in relaid.items():
        assert abs(loss - straight[step]) / straight[step] < LOSS_TOLERANCE, (step, straight, relaid)
    assert results["max_weight_diff"] < WEIGHT_TOLERANCE, results["max_weight_diff"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_at_another_layout_warns_that_the_sample_order_changes(launched: tuple[dict, str]) -> None:
    _, stdout = launched
    assert "written with dp=1 x parallel.sp=4, this run has dp=2 x parallel.sp=2" in stdout
    assert "sample order from here on differs" in stdout
    assert "sequences per step" not in stdout  # two sequences per step in both layouts: no batch warning


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    run_both_layouts(Path(sys.argv[1]), Path(sys.argv[2]))
