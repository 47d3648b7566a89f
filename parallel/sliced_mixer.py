"""The mixer's strategies when its sequence is split across the sp ranks: the model code is not touched.

`slice_mixers` sets, on each `TTTMixer`, the scan strategy (`StateExchangeScan` in the parallel form,
`RingScan` in the recurrent form) and the window strategy (`HaloWindowAttention`) through
`TTTMixer.set_strategies`; the mixer's own forward runs them. Parameter names, and so checkpoints,
stay those of the plain model. What changes across the slice boundary:

* the fast-weight branch: the state exchange (parallel form) or the ring (recurrent form);
* the sliding-window attention: the previous rank's last `window - 1` rotated keys and values (the
  halo) are prepended, with zero queries in front of ours whose outputs are dropped, so the same
  attention function runs on [halo; slice]; RoPE positions are absolute, set by position_offset.

Packed-document resets exist only without sequence parallelism: `parallel.sequence_parallel.ChunkAlignedRows`
refuses document ids where a sliced forward enters, so no strategy here sees segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

from kernels.fast_weights import FastWeights
from model.swa import sliding_window_attention
from model.config import TTTConfig
from model.fast_weight_scan import ChunkScan, ScanWeights, TTTInputs, local_w1_chunk_scan
from model.ttt_layer import LocalScan, LocalWindow, RowPositions, TTTMixer
from parallel.groups import ParallelDims
from parallel.layout import SliceLayout
from parallel.p2p import shift_rows
from parallel.ring import receive_state, send_state
from parallel.state_exchange import state_exchange_scan


@dataclass
class SliceContext:
    """Shared by the strategies of one model: the process layout (`dims`), and the layout of the current forward."""

    dims: ParallelDims
    layout: Optional[SliceLayout] = None


@dataclass
class StateExchangeScan(LocalScan):
    """The linear-attention form on this rank's slice: the local scan's `__call__`, whose W1 chunk scan
    (the local one) runs from the zero state while the state maps of all ranks travel
    (`parallel.state_exchange`)."""

    dims: ParallelDims

    def w1_chunk_scan(self, ttt: TTTConfig) -> ChunkScan:
        """The local W1 chunk scan on this rank's slice, inside the state exchange."""
        return partial(state_exchange_scan, local_w1_chunk_scan(ttt), self.dims)


@dataclass
class RingScan(LocalScan):
    """The recurrent form on this rank's slice (`parallel.ring`): the state rank r-1 leaves the layer
    with enters, and the state this slice leaves with goes on to rank r+1."""

    dims: ParallelDims

    def __call__(
        self, weights: ScanWeights, x: torch.Tensor, inputs: TTTInputs, state: Optional[FastWeights], rows: RowPositions
    ) -> tuple[torch.Tensor, FastWeights]:
        """x [B, T, D] is the receive's anchor in the autograd graph (its backward sends the state's gradient home)."""
        dims = self.dims
        if dims.sp_rank > 0:
            state = receive_state(x, weights.initial_state(x.shape[0]), weights.ttt.momentum, dims)
        ttt_out, final = super().__call__(weights, x, inputs, state, rows)
        if dims.sp_rank < dims.sp - 1:  # before the halo: messages to a neighbour keep one order
            ttt_out = send_state(ttt_out, final, dims)
        return ttt_out, final


@dataclass
class HaloWindowAttention(LocalWindow):
    """The attention branch on this rank's tokens, reading the previous rank's halo; it builds its own
    mask for [halo; slice], so it reads none from the LM."""

    reads_window_mask = False

    context: SliceContext

    def __call__(
        self, mixer: TTTMixer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowPositions, window_mask: Any
    ) -> torch.Tensor:
        """[B, T, D] projections -> [B, T, D]."""
        batch, seq_len, hidden = q.shape
        layout = self.context.layout
        q, k, v = mixer.attention_heads(q, k, v, rows.offset, rope=rows.rope)  # [B, T, A, Dh], rotated to absolute positions
        keys_values = torch.cat([k, v], dim=-1)
        halo = shift_rows(keys_values[:, seq_len - layout.halo_to_next :], layout.halo_from_previous, +1, self.context.dims)
        halo_k, halo_v = halo.chunk(2, dim=-1)
        padded_q = torch.cat([q.new_zeros((batch, layout.halo_from_previous, *q.shape[2:])), q], dim=1)
        out = sliding_window_attention(
            padded_q, torch.cat([halo_k, k], dim=1), torch.cat([halo_v, v], dim=1), mixer.cfg.window_size
        )
        return out[:, layout.halo_from_previous :].reshape(batch, seq_len, hidden)


def slice_mixers(model: nn.Module, context: SliceContext) -> int:
    """Set every TTTMixer of `model` to run on this rank's slice; returns how many were set."""
    mixers = [module for module in model.modules() if isinstance(module, TTTMixer)]
    for mixer in mixers:
        scan = StateExchangeScan(context.dims) if mixer.cfg.ttt.mode == "linear_attention" else RingScan(context.dims)
        mixer.set_strategies(scan=scan, window=HaloWindowAttention(context))
    return len(mixers)
