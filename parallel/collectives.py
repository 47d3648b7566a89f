"""Flat-tensor collectives under one name across torch releases.

torch 2.14 renamed `all_gather_into_tensor` / `reduce_scatter_tensor` to `all_gather_single` /
`reduce_scatter_single` and deprecated the old names; GPU images still ship earlier releases
that only have the old ones. Callers use these two functions and never see the difference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(output: torch.Tensor, local: torch.Tensor, group: Optional[ProcessGroup], async_op: bool = False):
    """output [world * n] <- every rank's local [n], in rank order; returns a work handle when async."""
    return _all_gather(output, local, group=group, async_op=async_op)


def reduce_scatter_flat(output: torch.Tensor, full: torch.Tensor, group: Optional[ProcessGroup]) -> None:
    """output [n] <- sum over ranks of this rank's block of full [world * n]."""
    _reduce_scatter(output, full, group=group)
