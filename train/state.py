"""What the training loop carries from step to step, beside what the engine holds (model, optimizer, schedule).

A checkpoint keeps it in two parts (train/checkpoint.py): `state_dict()`, the same on every rank,
goes into the engine's files as DeepSpeed's client state; `rank_state_dict()`, each rank's own,
goes into that rank's `rank_XXXXX.pt`. The keys are those of every checkpoint written so far; a key
added later must be optional on load (`sequences_per_step` is: older checkpoints lack it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataLoader


def capture_rng() -> dict[str, Any]:
    """This process's random-number generators: python, numpy, torch (and every CUDA device's)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """The run's position: completed steps, skipped steps, and where this rank's data loader stands."""

    loader: StreamingDataLoader  # this rank's training batches; its state is its position in the epoch
    sequences_per_step: int  # this run's batch: train.micro_batch_size x train.grad_accum x dp
    step: int = 0  # completed optimizer steps
    nonfinite_skipped: int = 0  # steps whose update the optimizer skipped (non-finite), over the whole run
    nonfinite_streak: int = 0  # of those, the ones in a row up to `step`; not saved, a resumed run starts afresh

    def state_dict(self) -> dict[str, Any]:
        """The counters, the same on every rank (saved once, with the engine)."""
        return {
            "step": self.step,
            "nonfinite_skipped": self.nonfinite_skipped,
            "sequences_per_step": self.sequences_per_step,
        }

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's own: its data loader's position and its random-number generators."""
        return {"loader": self.loader.state_dict(), "rng": capture_rng()}

    def load_state_dict(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Continue from a checkpoint's states; this run's `sequences_per_step` stays (resume compares the two)."""
        restore_rng(rank_state["rng"])
        self.loader.load_state_dict(rank_state["loader"])
        self.step, self.nonfinite_skipped = state["step"], state["nonfinite_skipped"]
        self.nonfinite_streak = 0
