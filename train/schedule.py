"""Learning-rate schedules as multipliers of `train.lr`, for torch's LambdaLR.

* cosine: linear warmup, then cosine decay from 1 to `min_lr_ratio` at `steps`;
* wsd (warmup-stable-decay): warmup, constant 1, then a linear decay to `min_lr_ratio` over the
  last `decay_fraction` of the steps, so a run can be extended before its decay starts;
* constant: warmup, then 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from train.config import TrainConfig


def lr_multiplier(train: TrainConfig) -> Callable[[int], float]:
    """step (optimizer steps taken so far) -> multiplier of train.lr."""
    warmup, total, floor = train.warmup_steps, train.steps, train.min_lr_ratio
    decay_start = total - max(1, int(round(train.decay_fraction * total)))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.schedule == "constant":
            return 1.0
        if train.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1 - (1 - floor) * progress

    return multiplier


def scheduler_factory(train: TrainConfig) -> Callable[[torch.optim.Optimizer], LambdaLR]:
    """What deepspeed.initialize wants: a callable building the scheduler on its wrapped optimizer."""
    return lambda optimizer: LambdaLR(optimizer, lr_multiplier(train))


def realign_after_resume(scheduler: LambdaLR, lr: float) -> None:
    """Set the optimizer's learning rate from the current config at the restored step.

    A checkpoint restores the scheduler's step and the lr it last set; a resumed run may have
    changed `train.lr` or `train.steps` (extending a WSD run), so the lr is recomputed with the
    same formula LambdaLR uses. With an unchanged config this reproduces the stored value exactly.
    """
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, multiplier in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * multiplier(scheduler.last_epoch)
