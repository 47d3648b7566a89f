"""What `train.engine.deepspeed_config` hands DeepSpeed for the ZeRO options a run leaves on auto.

`zero.overlap_comm` left unset overlaps gradient reduction with the backward only where there is a
reduction to overlap (more than one rank): on one GPU DeepSpeed's ZeRO-2 would otherwise synchronise
the device after every micro-batch for nothing. A value the run sets wins either way.
"""

from __future__ import annotations

from typing import Optional

import pytest

from parallel.groups import ParallelDims
from train.config import load_run_config
from train.engine import deepspeed_config


@pytest.mark.parametrize(
    "world, setting, expected",
    [(1, None, False), (2, None, True), (8, None, True), (1, True, True), (4, False, False)],
)
def test_overlap_comm_is_on_only_with_something_to_overlap(world: int, setting: Optional[bool], expected: bool) -> None:
    overrides = [] if setting is None else [f"zero.overlap_comm={str(setting).lower()}"]
    cfg = load_run_config("configs/train/tiny_cpu.yaml", overrides)
    assert cfg.zero.overlap_comm is setting
    zero = deepspeed_config(cfg, ParallelDims(world=world, rank=0, sp=1), bf16=False)["zero_optimization"]
    assert zero["overlap_comm"] is expected
