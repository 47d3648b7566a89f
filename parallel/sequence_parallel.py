"""`SequenceParallelLM`: a TTTLM whose sequences are split across the sp ranks of a group.

Each rank calls it with its slice [B, T/sp] (from `parallel.groups.slice_sequence`), exactly as it
would call the TTTLM on whole sequences. Wrapping sets the model's two seams: its row layout
(`ChunkAlignedRows`, `TTTLM.set_rows`: ids of a chunk that straddles two slices are moved to the
rank where the chunk starts (`parallel.layout`), and the hidden rows of moved tokens come back before
the head, so logits and per-token losses are those of this rank's own slice) and every mixer's
strategies (`parallel.sliced_mixer`: the state exchange or the ring, and the window halo).

The loss, and why it is scaled. DeepSpeed (like DDP) averages gradients over all dp x sp ranks.
The single-process objective is the mean over the dp groups of each group's token-mean loss, so
with n_r targets and loss sum L_r on sp rank r of a group, N = sum_r n_r:

    backward on   sp * L_r / N       (gradient averaged over dp*sp ranks = gradient of the dp-mean loss)
    report        sum_r L_r / N      (the true mean over the group's full sequences)

`.loss` carries both: its value is the reported mean and its gradient is that of the backward
objective (value + (objective - objective.detach())), so `engine.backward(output.loss)` and
`log(output.loss)` are both right. `.reported_loss` is the same value, detached. `.loss_sum` and
`.num_targets` stay this rank's own (a sum over all ranks gives the exact global totals).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from model.config import LMConfig
from model.lm import LMOutput, TTTLM, WholeRows
from parallel.groups import ParallelDims
from parallel.layout import SliceLayout
from parallel.p2p import exchange_rows, shift_rows
from parallel.sliced_mixer import SliceContext, slice_mixers
from parallel.state_exchange import MUON_ERROR


@dataclass
class SequenceParallelOutput(LMOutput):
    reported_loss: Optional[torch.Tensor] = None  # detached mean over the sp group's full sequences


class ChunkAlignedRows(WholeRows):
    """`TTTLM.rows` on one sp rank: the blocks run the chunks that start in this rank's slice
    (`parallel.layout`), and the head reads exactly the slice."""

    def __init__(self, cfg: LMConfig, context: SliceContext) -> None:
        self.cfg = cfg
        self.context = context

    def computed_ids(
        self, input_ids: torch.Tensor, position_offset: Union[int, torch.Tensor], doc_ids: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Union[int, torch.Tensor]]:
        """This rank's slice [B, T/sp] -> its ids [B, computed] without those lent to rank r-1, with those
        borrowed from rank r+1; position_offset (where the full sequences start) -> the first computed
        token's. Sets the layout of this forward for the mixers' strategies."""
        if doc_ids is not None:
            raise ValueError("data.reset_at_doc_boundaries needs parallel.sp=1: the state exchange carries one sequence across ranks")
        dims = self.context.dims
        layout = SliceLayout.build(input_ids.shape[1], self.cfg, dims)
        self.context.layout = layout
        borrowed = exchange_rows(input_ids[:, : layout.lent_to_previous], layout.borrowed_from_next, -1, dims)
        return torch.cat([input_ids[:, layout.lent_to_previous :], borrowed], dim=1), position_offset + layout.start

    def head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden rows [B, computed, D] -> this rank's slice [B, T/sp, D]: the rows of borrowed tokens go
        back to rank r+1, those lent to rank r-1 come back from it (differentiable)."""
        layout = self.context.layout
        kept = hidden.shape[1] - layout.borrowed_from_next
        returned = shift_rows(hidden[:, kept:], layout.lent_to_previous, +1, self.context.dims)
        return torch.cat([returned, hidden[:, :kept]], dim=1)


class SequenceParallelLM(nn.Module):
    """TTTLM's forward on this rank's slice; see the module docstring for the loss contract.

    Wrapping binds `model` to `dims` (its row layout and mixer strategies are set in place, as DDP
    owns its module); the plain model is `self.model`, whose state_dict has the usual parameter names.
    """

    def __init__(self, model: TTTLM, dims: ParallelDims) -> None:
        super().__init__()
        ttt = model.cfg.ttt
        if dims.sp > 1 and ttt.mode == "linear_attention" and ttt.muon:
            raise ValueError(MUON_ERROR)
        self.model = model
        self.dims = dims
        if dims.sp > 1:
            context = SliceContext(dims)
            model.set_rows(ChunkAlignedRows(model.cfg, context))
            slice_mixers(model, context)

    def forward(self, *args: Any, **kwargs: Any) -> SequenceParallelOutput:
        """`TTTLM.forward`'s arguments: input_ids, targets [B, T/sp] are this rank's slice, position_offset
        is where the full sequences start; packed-document resets (`doc_ids`) need sp = 1."""
        out = self.model(*args, **kwargs)
        if out.loss_sum is None:
            return SequenceParallelOutput(out.logits, None, None, None, out.states)
        dims = self.dims
        totals = torch.stack([out.loss_sum.detach().double(), out.num_targets.double()])
        if dims.sp > 1:
            dist.all_reduce(totals, group=dims.sp_group)
        group_targets = totals[1].clamp(min=1)
        reported = (totals[0] / group_targets).to(out.loss_sum.dtype)
        objective = dims.sp * out.loss_sum / group_targets.to(out.loss_sum.dtype)
        loss = reported + (objective - objective.detach())
        return SequenceParallelOutput(out.logits, loss, out.loss_sum, out.num_targets, out.states, reported)


def average_gradients(module: nn.Module, dims: ParallelDims) -> None:
    """What DeepSpeed/DDP do to gradients, for runs without them: the mean over all dp x sp ranks.

    A parameter without a gradient on this rank counts as zero: in the ring, the last slice's final
    chunk updates only the final state, so its learning-rate heads may see no gradient there.
    """
    if dims.world == 1:
        return
    for parameter in module.parameters():
        if parameter.requires_grad:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad /= dims.world
