"""ZeRO-1/2 leave every parameter on a 16-byte boundary, and checkpoints written before they did still resume.

DeepSpeed's ZeRO-1/2 turn the parameters into views of one flat buffer per group. Packed end to end,
a parameter that follows one of odd size (the tiny model's 6-element learning-rate bias, fp32 here;
the 125M model's 12- and 4-element biases in bf16) starts off a 16-byte boundary, and a compiled
block's Triton code, which assumes the alignment it was compiled with, then reads it with a
misaligned vector load (a CUDA error on the GPU). `train.engine` asks DeepSpeed to pad each one.

`torchrun --nproc_per_node=1 -m tests.test_zero_alignment OUT.json` builds the trainer's engine for
ZeRO-1 and ZeRO-2 and records each parameter's offset, then trains a few steps with the padding off,
saves, and resumes with it on: the resumed weights must equal those of a run that never stopped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.multiprocess import REPO, end_distributed, run_torchrun

TINY = REPO / "configs/train/tiny_cpu.yaml"
STEPS_BEFORE, STEPS_AFTER = 2, 2


def engine_for(stage: int, padded: bool = True):
    """The trainer's engine (train.engine.build_engine) for the tiny config at ZeRO `stage`, with DeepSpeed's
    per-parameter padding as the trainer sets it, or switched off as it was before."""
    import train.engine as engine_module
    from train.config import load_run_config
    from train.distributed import init_distributed

    cfg = load_run_config(TINY, [f"zero.stage={stage}", "train.grad_accum=1", "train.micro_batch_size=2"])
    dims = init_distributed(1)
    torch.manual_seed(0)
    if padded:
        return engine_module.build_engine(cfg, dims)[0]
    original = engine_module.deepspeed_config

    def unpadded(*args):
        config = original(*args)
        config["zero_optimization"]["parameter_alignment"] = False
        return config

    engine_module.deepspeed_config, check = unpadded, engine_module.check_parameter_alignment
    engine_module.check_parameter_alignment = lambda model: None
    try:
        return engine_module.build_engine(cfg, dims)[0]
    finally:
        engine_module.deepspeed_config, engine_module.check_parameter_alignment = original, check


def train_steps(engine, first: int, count: int) -> None:
    for step in range(first, first + count):
        tokens = torch.randint(0, 256, (2, 65), generator=torch.Generator().manual_seed(step))
        out = engine(tokens[:, :-1], tokens[:, 1:], return_logits=False)
        engine.backward(out.loss)
        engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def resume_across_the_padding(folder: Path) -> float:
    """Largest difference between a run resumed (padded) from an unpadded checkpoint and one that never stopped."""
    straight = engine_for(2, padded=False)
    train_steps(straight, 0, STEPS_BEFORE + STEPS_AFTER)
    before = engine_for(2, padded=False)
    train_steps(before, 0, STEPS_BEFORE)
    before.save_checkpoint(str(folder), tag="step")
    resumed = engine_for(2, padded=True)
    resumed.load_checkpoint(str(folder), tag="step")
    train_steps(resumed, STEPS_BEFORE, STEPS_AFTER)
    expected, actual = weights(straight), weights(resumed)
    return max((actual[name] - expected[name]).abs().max().item() for name in expected)


def offsets(engine) -> dict[str, int]:
    return {name: p.data_ptr() % 16 for name, p in engine.module.named_parameters()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero_parameters_are_aligned_and_unpadded_checkpoints_resume(tmp_path):
    result = tmp_path / "result.json"
    run_torchrun(["-m", "tests.test_zero_alignment", str(result)], processes=1, timeout=280)
    found = json.loads(result.read_text())
    for stage in ("1", "2"):
        misaligned = {name: offset for name, offset in found["offsets"][stage].items() if offset}
        assert not misaligned, f"ZeRO-{stage}: parameters off a 16-byte boundary (name: bytes past it): {misaligned}"
    # The same fp32 steps in the same order: the resumed weights equal the uninterrupted ones exactly.
    assert found["resume_difference"] == 0.0


if __name__ == "__main__":
    out = Path(sys.argv[1])
    results = {"offsets": {str(stage): offsets(engine_for(stage)) for stage in (1, 2)}}
    results["resume_difference"] = resume_across_the_padding(out.parent / "checkpoint")
    out.write_text(json.dumps(results))
    end_distributed()
