"""Joining the world: one entry point for every launcher, and the few collectives the loop needs.

torchrun (single or multi-node) and the `deepspeed` launcher set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT, and a plain `python -m train` gets a one-process world. CUDA runs use
NCCL, CPU runs gloo. The layout of the world (dp x sp, device, groups) is `parallel.groups.ParallelDims`.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist

from parallel.groups import ParallelDims
from train.job.errors import RunError
from train.job.supervision import end_with_launcher


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_environment() -> None:
    """A plain `python -m train` run: a world of one on this host."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def skip_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from building and mapping its shared-memory all-reduce.

    DeepSpeed JIT-compiles that extension on first use and maps /dev/shm segments named after
    MASTER_PORT at start-up, yet only its inference all-reduce uses them: training talks through
    torch.distributed (gloo) alone. Skipping it saves the one-off build and removes a start-up step
    that aborted a rank now and then when several multi-process jobs shared one host.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(sp: int) -> ParallelDims:
    """Join (or create) the process group and build the dp x sp layout; idempotent.

    A process started by a launcher (RANK set) stops when the launcher is gone (train/job/supervision.py).
    """
    if "RANK" in os.environ:
        end_with_launcher()
    _single_process_environment()
    if "LOCAL_SIZE" in os.environ:  # the deepspeed launcher's name; streaming reads torchrun's
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["LOCAL_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed  # imported here so that checkpoint inspection and export stay light

        if backend == "gloo":
            skip_deepspeed_shm_allreduce()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return ParallelDims.build(sp, device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum of per-rank scalars over the world, in fp64 (one collective for several values)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), indexed by rank, on every rank: one collective."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def agree_on_failure(failure: Optional[str]) -> None:
    """One collective: every rank raises RunError when any rank reports a failure (the lowest rank's message)."""
    failures = [message for message in all_gather_objects(failure) if message]
    if failures:
        raise RunError(failures[0])
