"""Sharded, atomically published, verified checkpoints with keep-last-K and automatic resume.

Layout under the checkpoint root:

    step_00000300/                   a complete checkpoint (what resume reads)
        <DeepSpeed files>            model + optimizer + scheduler, one ZeRO shard per rank
        rank_00000.pt ...            per rank: RNG states (python, numpy, torch, cuda), data-loader state
        run.yaml                     the resolved run config (export reads the model from it)
        complete.json                written last: step, world size, its dp x sp layout, and every
                                     file's size and SHA-256 (train/checkpoint_integrity.py)
    step_00000200.damaged/           a checkpoint that failed verification, set aside, never deleted
    .staging-step_00000400/          a save in progress; never read, removed at the next save

Every rank writes into the staging folder, the ranks hash its files between them, and rank 0
writes the marker and renames the folder to its final name. A crash mid-save leaves only a
staging folder, and the previous checkpoints are untouched. A failed write (a full disk, a
permission error) on any rank is agreed on by all ranks, which then stop with one message naming
the path; the staging folder is removed and the previous checkpoint stays as it was. The root must
be on a filesystem all ranks share (as DeepSpeed requires).

Resume (`train.resume=auto`) takes the newest checkpoint that every rank verifies: the ranks check
it (sizes everywhere, checksums shared out) and agree in one collective; a damaged one is set aside
with a warning naming it and why, and the next older one is tried. When none is left but some were
set aside, the run stops rather than start again from step 0 over the run's history.

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
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from model.config import ConfigError
from parallel.groups import ParallelDims
from train.checkpoint_integrity import (
    DAMAGED_SUFFIX, MARKER, checkpoint_files, damaged_checkpoints, file_records, read_marker, set_aside, verify,
)  # fmt: skip
from train.distributed import agree_on_failure, all_gather_objects
from train.job.cli import warn
from train.job.errors import RunError, describe_os_error, free_space

STEP_PATTERN = re.compile(r"^step_(\d+)$")
STAGING_PREFIX = ".staging-"
RUN_CONFIG = "run.yaml"
# What torch's zip writer raises (as RuntimeError, not OSError) when a write fails, e.g. on a full disk.
WRITE_FAILURE_TEXTS = ("iostream error", "file write failed", "unexpected pos")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under `root` (those holding a marker, verified or not), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_PATTERN.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def _verified_everywhere(folder: Path, dims: ParallelDims) -> Optional[str]:
    """Why some rank rejects `folder` (None if every rank verified its share): one collective."""
    reasons = [reason for reason in all_gather_objects(verify(folder, dims.rank, dims.world)) if reason]
    return reasons[0] if reasons else None


def select_checkpoint(resume: str, root: Path, dims: ParallelDims) -> Optional[Path]:
    """The checkpoint to resume from, the same on every rank; every rank calls it.

    `none` -> None; a folder -> that folder, refused if damaged; `auto` -> the newest checkpoint
    every rank verifies, setting damaged newer ones aside with a warning; None if there never was
    one, RunError if every one was damaged (now or by an earlier run).
    """
    if resume == "none":
        return None
    if resume != "auto":
        folder = Path(resume)
        if not (folder / MARKER).is_file():
            raise ConfigError(f"train.resume={resume!r} is not a complete checkpoint (no {MARKER}); pick a step_* folder")
        reason = _verified_everywhere(folder, dims)
        if reason:
            raise RunError(f"train.resume={resume!r} is damaged: {reason}; pick another step_* folder or train.resume=auto")
        return folder
    damaged = [folder.name for folder in damaged_checkpoints(root)]  # read before rank 0 sets more aside
    for folder in reversed(complete_checkpoints(root)):
        reason = _verified_everywhere(folder, dims)
        if reason is None:
            return folder
        aside = set_aside(folder) if dims.is_main else folder
        warn(f"train.resume=auto: {folder} is damaged ({reason}); moved it to {aside} and trying the previous checkpoint")
        damaged.append(f"{folder.name}{DAMAGED_SUFFIX}")
    if damaged:
        raise RunError(
            f"train.resume=auto: no usable checkpoint in {root}: every one is damaged and set aside "
            f"({', '.join(sorted(damaged))}); to start afresh on purpose, run with train.resume=none "
            f"(it replaces the run's metrics and TensorBoard history) or with another logging.run_dir"
        )
    return None


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.pt"


def write_rank_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def _write_failure(action: Callable[[], Any], folder: Path) -> Optional[str]:
    """Run `action`; a failed write becomes a message naming the path and the free space, else None."""
    try:
        action()
    except OSError as error:
        return f"{describe_os_error(error, folder)} ({free_space(folder)} free there)"
    except RuntimeError as error:
        if not any(text in str(error) for text in WRITE_FAILURE_TEXTS):
            raise
        return f"{folder}: write failed ({error}); {free_space(folder)} free there, a full disk is the usual cause"
    return None


def _agree_on_save(failure: Optional[str], step: int, staging: Path, dims: ParallelDims) -> None:
    """One collective; on a failure anywhere rank 0 removes the staging folder and every rank raises."""
    try:
        agree_on_failure(failure)
    except RunError as error:
        if dims.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        previous = complete_checkpoints(staging.parent)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise RunError(
            f"saving checkpoint step {step} failed: {error}; {kept}. Fix that, then continue with train.resume=auto "
            f"(or set checkpoint.dir to another filesystem)"
        ) from error


def save_checkpoint(
    engine: Any, root: Path, step: int, dims: ParallelDims, client_state: dict[str, Any], rank_state: dict[str, Any],
    run_config_yaml: str, keep_last: int,
) -> Path:  # fmt: skip
    """Write, verify-record, publish and prune; every rank calls it. Returns the published folder."""
    final = root / checkpoint_name(step)
    staging = root / (STAGING_PREFIX + final.name)

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / RUN_CONFIG).write_text(run_config_yaml)

    def write() -> None:
        engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
        write_rank_state(rank_file(staging, dims.rank), rank_state)

    _agree_on_save(_write_failure(prepare, staging) if dims.is_main else None, step, staging, dims)
    _agree_on_save(_write_failure(write, staging), step, staging, dims)
    names = checkpoint_files(staging)
    files: dict[str, dict[str, Any]] = {}
    for part in all_gather_objects(file_records(staging, names, dims.rank, dims.world)):
        files.update(part)
    marker = {"step": step, "world": dims.world, "dp": dims.dp, "sp": dims.sp, "files": files}

    def publish() -> None:
        (staging / MARKER).write_text(json.dumps(marker) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        _prune(root, keep_last)

    _agree_on_save(_write_failure(publish, staging) if dims.is_main else None, step, staging, dims)
    return final


def _prune(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(engine: Any, folder: Path, dims: ParallelDims) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore the engine (model, optimizer, scheduler); returns the (client, rank) states saved beside it.

    Returns on every rank only once every rank has loaded (one collective), so that a rank that
    fails makes all of them stop with its message.
    """
    marker = read_marker(folder)
    if marker["world"] != dims.world:
        raise ConfigError(
            f"train.resume: {folder} was written by {marker['world']} processes but this run has {dims.world}; "
            f"resume with the same number of processes (or export it with python -m train.generation.export)"
        )
    written_sp = marker.get("sp", dims.sp)  # markers written before the layout was recorded carry no sp
    if written_sp != dims.sp:
        warn(
            f"train.resume: {folder} was written with dp={dims.world // written_sp} x "
            f"parallel.sp={written_sp}, this run has dp={dims.dp} x parallel.sp={dims.sp}. Model, optimizer, "
            f"scheduler and step are restored exactly; the data continues the epoch from the same sample "
            f"but is dealt to {dims.dp} data-parallel replicas instead of {dims.world // written_sp}, so the "
            f"sample order from here on differs from the uninterrupted run (each step reads the same "
            f"samples only if train.micro_batch_size x train.grad_accum x dp is unchanged)"
        )
    failure = None
    try:
        path, client_state = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ValueError("DeepSpeed found no checkpoint in it")
        rank_state = torch.load(rank_file(folder, dims.rank), map_location="cpu", weights_only=False)
    except Exception as error:  # any failure to read: every rank must hear of it, not wait for this one
        failure = f"train.resume: loading {folder} failed on rank {dims.rank}: {error}"
    agree_on_failure(failure)
    return client_state, rank_state
