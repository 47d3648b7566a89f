"""Sharded, atomically published checkpoints with keep-last-K and automatic resume.

Layout under the checkpoint root:

    step_00000300/                   a complete checkpoint (what resume reads)
        <DeepSpeed files>            model + optimizer + scheduler, one ZeRO shard per rank
        rank_00000.pt ...            per rank: RNG states (python, numpy, torch, cuda), data-loader state
        run.yaml                     the resolved run config (export reads the model from it)
        complete.json                written last: step, world size and its dp x sp layout
    .staging-step_00000400/          a save in progress; never read, removed at the next save

Every rank writes into the staging folder, all ranks meet at a barrier, and rank 0 renames it to
its final name. A crash mid-save leaves only a staging folder, and the previous checkpoints are
untouched. The root must be on a filesystem all ranks share (as DeepSpeed requires).

Resume needs the same world size, but may change the dp x sp split of it. DeepSpeed is given no
`mpu`, so ZeRO shards model and optimizer over the whole world in every layout: the shards, the
scheduler and the step load exactly. The data-loader state is mosaicml-streaming's global position
in the epoch (samples consumed, counted once per sp group) and its global sample order does not
depend on the number of replicas, so the resumed run continues the epoch from the same sample,
but deals the samples to a different number of dp replicas; it is not bit-for-bit the uninterrupted
run, and resuming says so.
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
        marker = {"step": step, "world": layout.world, "dp": layout.dp, "sp": layout.sp}
        (staging / MARKER).write_text(json.dumps(marker) + "\n")
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
    marker = json.loads((folder / MARKER).read_text())
    if marker["world"] != layout.world:
        raise ConfigError(
            f"train.resume: {folder} was written by {marker['world']} processes but this run has {layout.world}; "
            f"resume with the same number of processes (or export it with python -m train.export)"
        )
    written_sp = marker.get("sp", layout.sp)  # markers written before the layout was recorded carry no sp
    if written_sp != layout.sp and layout.is_main:
        print(
            f"warning: train.resume: {folder} was written with dp={layout.world // written_sp} x "
            f"parallel.sp={written_sp}, this run has dp={layout.dp} x parallel.sp={layout.sp}. Model, optimizer, "
            f"scheduler and step are restored exactly; the data continues the epoch from the same sample "
            f"but is dealt to {layout.dp} data-parallel replicas instead of {layout.world // written_sp}, so the "
            f"sample order from here on differs from the uninterrupted run (each step reads the same "
            f"samples only if train.micro_batch_size x train.grad_accum x dp is unchanged)",
            flush=True,
        )
    path, client_state = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ConfigError(f"train.resume: DeepSpeed found no checkpoint in {folder}")
    rank_state = torch.load(rank_file(folder, layout.rank), map_location="cpu", weights_only=False)
    restore_rng(rank_state.pop("rng"))
    return client_state, rank_state
