"""Sharded, atomically published checkpoints with keep-last-K and automatic resume.

Layout under the checkpoint root:

    step_00000300/                   a complete checkpoint (what resume reads)
        <DeepSpeed files>            model + optimizer + scheduler, one ZeRO shard per rank
        rank_00000.pt ...            per rank: RNG states (python, numpy, torch, cuda), data-loader state
        run.yaml                     the resolved run config (export reads the model from it)
        complete.json                written last: step and world size
    .staging-step_00000400/          a save in progress; never read, removed at the next save

Every rank writes into the staging folder, all ranks meet at a barrier, and rank 0 renames it to
its final name. A crash mid-save leaves only a staging folder, and the previous checkpoints are
untouched. The root must be on a filesystem all ranks share (as DeepSpeed requires).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from model.config import ConfigError
from train.distributed import Layout, barrier

STEP_PATTERN = re.compile(r"^step_(\d+)$")
STAGING_PREFIX = ".staging-"
MARKER = "complete.json"
RUN_CONFIG = "run.yaml"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_PATTERN.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """`none` -> None; `auto` -> the newest complete checkpoint (None if there is none); else a folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    folder = Path(resume)
    if not (folder / MARKER).is_file():
        raise ConfigError(f"train.resume={resume!r} is not a complete checkpoint (no {MARKER}); pick a step_* folder")
    return folder


def capture_rng() -> dict[str, Any]:
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


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.pt"


def save_checkpoint(
    engine: Any, root: Path, step: int, layout: Layout, client_state: dict[str, Any], rank_state: dict[str, Any],
    run_config_yaml: str, keep_last: int,
) -> Path:  # fmt: skip
    """Write, publish and prune; every rank calls it. Returns the published folder."""
    final = root / checkpoint_name(step)
    staging = root / (STAGING_PREFIX + final.name)
    if layout.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
    torch.save({**rank_state, "rng": capture_rng()}, rank_file(staging, layout.rank))
    barrier()
    if layout.is_main:
        (staging / RUN_CONFIG).write_text(run_config_yaml)
        (staging / MARKER).write_text(json.dumps({"step": step, "world": layout.world}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(engine: Any, folder: Path, layout: Layout) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; returns (client, rank) states."""
    written_by = json.loads((folder / MARKER).read_text())["world"]
    if written_by != layout.world:
        raise ConfigError(
            f"train.resume: {folder} was written by {written_by} processes but this run has {layout.world}; "
            f"resume with the same number of processes (or export it with python -m train.export)"
        )
    path, client_state = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ConfigError(f"train.resume: DeepSpeed found no checkpoint in {folder}")
    rank_state = torch.load(rank_file(folder, layout.rank), map_location="cpu", weights_only=False)
    restore_rng(rank_state.pop("rng"))
    return client_state, rank_state
