"""Learning-rate schedules: warmup, then cosine / warmup-stable-decay / constant."""

from __future__ import annotations

import math

import pytest

from train.config import TrainConfig
from train.schedule import lr_multiplier


def test_warmup_is_linear_up_to_one() -> None:
    f = lr_multiplier(TrainConfig(steps=100, warmup_steps=10, schedule="cosine"))
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_ends_at_min_ratio_and_passes_the_midpoint() -> None:
    f = lr_multiplier(TrainConfig(steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1))
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # halfway: floor + (1 - floor) / 2
    assert f(110) == pytest.approx(0.1)


def test_wsd_is_flat_until_the_decay_fraction_then_linear() -> None:
    f = lr_multiplier(TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0))
    assert f(10) == f(79) == 1.0
    assert f(90) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)


def test_constant_after_warmup() -> None:
    f = lr_multiplier(TrainConfig(steps=50, warmup_steps=5, schedule="constant"))
    assert f(5) == f(49) == 1.0 and not math.isnan(f(0))


def test_resume_realigns_the_lr_to_a_changed_schedule() -> None:
    import torch

    from train.schedule import realign_after_resume, scheduler_factory

    short, extended = TrainConfig(steps=10, warmup_steps=0, lr=1.0), TrainConfig(steps=100, warmup_steps=0, lr=2.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = scheduler_factory(short)(optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    resumed = scheduler_factory(extended)(optimizer)
    resumed.load_state_dict(state)
    realign_after_resume(resumed, extended.lr)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * lr_multiplier(extended)(5))
