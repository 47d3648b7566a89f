"""Process groups for world = dp x sp ranks, and the slice of a sequence that one sp rank holds.

The sp ranks of one sequence-parallel group are consecutive global ranks (rank = dp_rank * sp +
sp_rank): on a multi-GPU host they share NVLink, where the per-layer state exchange and the window
halo travel, while the data-parallel gradient traffic (ZeRO) spans the whole world anyway.
`sp = 1` is the plain data-parallel case: every rank holds whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class ParallelGroups:
    """Where this process sits in the dp x sp grid, and the groups it communicates in."""

    world: int
    rank: int
    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    dp_group: Optional[ProcessGroup]  # ranks holding the same slice position of different sequences
    sp_group: Optional[ProcessGroup]  # ranks holding the slices of the same sequences

    def global_rank(self, sp_rank: int) -> int:
        """The global rank of member `sp_rank` of this process's sequence-parallel group."""
        return self.dp_rank * self.sp + sp_rank


def build_groups(sp: int) -> ParallelGroups:
    """Split the initialised default group into dp x sp; without torch.distributed, a world of one.

    Every rank creates every group (torch.distributed requires it), in the same order.
    """
    if sp < 1:
        raise ValueError(f"parallel.sp={sp} must be >= 1")
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else 1
    rank = dist.get_rank() if initialised else 0
    if world % sp != 0:
        raise ValueError(
            f"parallel.sp={sp} must divide the number of processes ({world}); launch a multiple of {sp} "
            f"processes or change parallel.sp"
        )
    dp = world // sp
    dp_rank, sp_rank = divmod(rank, sp)
    sp_group = dp_group = None
    if initialised:
        for group_index in range(dp):
            group = dist.new_group([group_index * sp + member for member in range(sp)])
            if group_index == dp_rank:
                sp_group = group
        for member in range(sp):
            group = dist.new_group([group_index * sp + member for group_index in range(dp)])
            if member == sp_rank:
                dp_group = group
        _warm_up(sp_group)
    return ParallelGroups(world, rank, dp, sp, dp_rank, sp_rank, dp_group, sp_group)


def _warm_up(group: ProcessGroup) -> None:
    """One all-reduce so the group's communicator exists before the first neighbour exchange
    (NCCL requires every member in the first point-to-point batch of a group; the halo exchange
    leaves the edge ranks out of one direction)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    dist.all_reduce(torch.zeros(1, device=device), group=group)


def slice_sequence(tensor: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """[B, T] -> [B, T / sp]: the contiguous slice of the sequences this sp rank holds."""
    seq_len = tensor.shape[1]
    if seq_len % groups.sp != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by parallel.sp={groups.sp}; pick data.seq_len as a "
            f"multiple of parallel.sp"
        )
    local = seq_len // groups.sp
    return tensor[:, groups.sp_rank * local : (groups.sp_rank + 1) * local]


def gather_sequence(local: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """[B, T / sp] -> [B, T]: the inverse of `slice_sequence`, on every rank of the sp group."""
    if groups.sp == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(groups.sp)]
    dist.all_gather(pieces, local.contiguous(), group=groups.sp_group)
    return torch.cat(pieces, dim=1)
