"""Neighbour exchange inside a sequence-parallel group, with the gradient sent back the other way.

One primitive serves the window halo, the borrowed rows of a straddling chunk and the ring of the
recurrent form: every rank sends a block of rows to the rank `step` places after it (if there is
one) and receives a block from the rank `step` places before it. Its adjoint is the same exchange
with `-step`: a row's gradient goes home to the rank that sent the row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.groups import ParallelDims


def exchange_rows(outgoing: torch.Tensor, incoming_rows: int, step: int, dims: ParallelDims) -> torch.Tensor:
    """Send `outgoing` [B, n, *] to sp rank + step; return the [B, incoming_rows, *] block from sp rank - step.

    A rank without that neighbour, or with nothing to move, skips that side (the peer skips the
    matching side: both derive the counts from the same layout). Not differentiable; see `shift_rows`.
    """
    target, source = dims.sp_rank + step, dims.sp_rank - step
    incoming = outgoing.new_empty((outgoing.shape[0], incoming_rows, *outgoing.shape[2:]))
    operations = []
    if 0 <= target < dims.sp and outgoing.shape[1] > 0:
        operations.append(dist.P2POp(dist.isend, outgoing.contiguous(), dims.global_rank(target), dims.sp_group))
    if 0 <= source < dims.sp and incoming_rows > 0:
        operations.append(dist.P2POp(dist.irecv, incoming, dims.global_rank(source), dims.sp_group))
    if operations:
        for request in dist.batch_isend_irecv(operations):
            request.wait()
    return incoming


class _ShiftRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outgoing: torch.Tensor, incoming_rows: int, step: int, dims: ParallelDims) -> torch.Tensor:
        ctx.sent_rows, ctx.step, ctx.dims = outgoing.shape[1], step, dims
        return exchange_rows(outgoing, incoming_rows, step, dims)

    @staticmethod
    def backward(ctx, grad_incoming: torch.Tensor):
        grad_outgoing = exchange_rows(grad_incoming, ctx.sent_rows, -ctx.step, ctx.dims)
        return grad_outgoing, None, None, None


def shift_rows(outgoing: torch.Tensor, incoming_rows: int, step: int, dims: ParallelDims) -> torch.Tensor:
    """`exchange_rows` as a differentiable op: the backward returns each received row's gradient to its sender."""
    return _ShiftRows.apply(outgoing, incoming_rows, step, dims)
