"""The process layout of a run: world = dp x sp ranks, their process groups, and a rank's slice of a sequence.

`ParallelDims` is built and validated once (`ParallelDims.build`, after torch.distributed is up);
everything else reads it: the training loop, the checkpoints, the data loader and the
sequence-parallel wrappers. The sp ranks of one sequence-parallel group are consecutive global
ranks (rank = dp_rank * sp + sp_rank): on a multi-GPU host they share NVLink, where the per-layer
state exchange and the window halo travel, while the data-parallel gradient traffic (ZeRO) spans
the whole world anyway; it is also the placement mosaicml-streaming's `replication=sp` gives the
same samples. `sp = 1` is the plain data-parallel case: every rank holds whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from model.config import ConfigError

CPU = torch.device("cpu")


@dataclass(frozen=True)
class ParallelDims:
    """Where this process sits in the dp x sp grid, its device, and the groups it communicates in.

    Constructing one checks that `sp` divides the world; without process groups (the fields left
    None) it is enough for layout arithmetic.
    """

    world: int
    rank: int
    sp: int  # sequence-parallel degree: ranks sharing one sequence
    device: torch.device = CPU
    sp_group: Optional[ProcessGroup] = None  # ranks holding the slices of the same sequences (sp > 1)
    dp_group: Optional[ProcessGroup] = None  # ranks holding the same slice position of different sequences (sp > 1)

    def __post_init__(self) -> None:
        if self.sp < 1 or self.world % self.sp:
            raise ConfigError(
                f"parallel.sp={self.sp} must divide the number of processes ({self.world}); launch a multiple of "
                f"{self.sp} processes or change parallel.sp"
            )

    @classmethod
    def build(cls, sp: int, device: torch.device = CPU) -> "ParallelDims":
        """This process's place in the initialised default group (a world of one without torch.distributed),
        with its process groups when sp > 1.

        Every rank creates every group (torch.distributed requires it), in the same order.
        """
        initialised = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if initialised else 1
        rank = dist.get_rank() if initialised else 0
        dims = cls(world, rank, sp, device)
        if not initialised or sp == 1:
            return dims
        sp_group, dp_group = _new_groups(dims)
        return replace(dims, sp_group=sp_group, dp_group=dp_group)

    @property
    def dp(self) -> int:
        """Data-parallel degree: sequences that are trained side by side."""
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def global_rank(self, sp_rank: int) -> int:
        """The global rank of member `sp_rank` of this process's sequence-parallel group."""
        return self.dp_rank * self.sp + sp_rank


def _new_groups(dims: ParallelDims) -> tuple[ProcessGroup, ProcessGroup]:
    """(sp group, dp group) of this rank; every rank creates all of them, in the same order."""
    sp_group = dp_group = None
    for group_index in range(dims.dp):
        group = dist.new_group([group_index * dims.sp + member for member in range(dims.sp)])
        if group_index == dims.dp_rank:
            sp_group = group
    for member in range(dims.sp):
        group = dist.new_group([group_index * dims.sp + member for group_index in range(dims.dp)])
        if member == dims.sp_rank:
            dp_group = group
    _warm_up(sp_group)
    return sp_group, dp_group


def _warm_up(group: ProcessGroup) -> None:
    """One all-reduce so the group's communicator exists before the first neighbour exchange
    (NCCL requires every member in the first point-to-point batch of a group; the halo exchange
    leaves the edge ranks out of one direction)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    dist.all_reduce(torch.zeros(1, device=device), group=group)


def slice_sequence(tensor: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """[B, T] -> [B, T / sp]: the contiguous slice of the sequences this sp rank holds (all of it when sp = 1)."""
    if dims.sp == 1:
        return tensor
    seq_len = tensor.shape[1]
    if seq_len % dims.sp != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by parallel.sp={dims.sp}; pick data.seq_len as a "
            f"multiple of parallel.sp"
        )
    local = seq_len // dims.sp
    return tensor[:, dims.sp_rank * local : (dims.sp_rank + 1) * local]


def gather_sequence(local: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """[B, T / sp] -> [B, T]: the inverse of `slice_sequence`, on every rank of the sp group."""
    if dims.sp == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(dims.sp)]
    dist.all_gather(pieces, local.contiguous(), group=dims.sp_group)
    return torch.cat(pieces, dim=1)
