"""A mixer's forward when its sequence is split across the sp ranks: the model code is not touched.

`split_mixers` replaces, on each `TTTMixer` instance, `forward` by `SlicedMixerForward` (built from the
mixer's own public pieces: qkv, ttt_inputs, ttt_scan, attention_heads, combine) and, in the parallel
form, `chunk_scan` by `StateExchangeScan`. Parameter names, and so checkpoints, stay those of the
plain model. What changes across the slice boundary:

* the fast-weight branch: the state exchange (parallel form) or the ring (recurrent form);
* the sliding-window attention: the previous rank's last `window - 1` rotated keys and values (the
  halo) are prepended, with zero queries in front of ours whose outputs are dropped, so the same
  attention function runs on [halo; slice]; RoPE positions are absolute, set by position_offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kernels.fast_weights import FastWeights
from model.swa import sliding_window_attention
from model.ttt_layer import TTTMixer
from parallel.groups import ParallelDims
from parallel.layout import SliceLayout
from parallel.p2p import shift_rows
from parallel.ring import receive_state, send_state
from parallel.state_exchange import StateExchangeScan


@dataclass
class SliceContext:
    """Shared by the wrapped mixers of one model: the groups, and the layout of the current forward."""

    groups: ParallelDims
    layout: Optional[SliceLayout] = None


def halo_window_attention(
    mixer: TTTMixer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_offset: int, context: SliceContext
) -> torch.Tensor:
    """The attention branch of `mixer` on this rank's tokens, reading the previous rank's halo: [B, T, D] -> [B, T, D]."""
    batch, seq_len, hidden = q.shape
    layout = context.layout
    q, k, v = mixer.attention_heads(q, k, v, position_offset)  # [B, T, A, Dh], rotated to absolute positions
    keys_values = torch.cat([k, v], dim=-1)
    halo = shift_rows(keys_values[:, seq_len - layout.halo_to_next :], layout.halo_from_previous, +1, context.groups)
    halo_k, halo_v = halo.chunk(2, dim=-1)
    padded_q = torch.cat([q.new_zeros((batch, layout.halo_from_previous, *q.shape[2:])), q], dim=1)
    out = sliding_window_attention(
        padded_q, torch.cat([halo_k, k], dim=1), torch.cat([halo_v, v], dim=1), mixer.cfg.window_size
    )
    return out[:, layout.halo_from_previous :].reshape(batch, seq_len, hidden)


class SlicedMixerForward:
    """Stands in for `TTTMixer.forward` on one instance: same signature, this rank's slice of the sequence."""

    def __init__(self, mixer: TTTMixer, context: SliceContext) -> None:
        self.mixer = mixer
        self.context = context

    def __call__(
        self, x: torch.Tensor, state: Optional[FastWeights] = None, position_offset: int = 0, segments: None = None,
        window_mask: None = None,
    ) -> tuple[torch.Tensor, FastWeights]:
        """The mixer's forward on this rank's slice; packed-document segments exist only without sequence
        parallelism, and the window attention runs over [halo; slice], so it builds its own mask."""
        mixer, groups = self.mixer, self.context.groups
        ring = mixer.cfg.ttt.mode == "recurrent"
        if ring and groups.sp_rank > 0:
            state = receive_state(x, mixer.initial_state(x.shape[0]), mixer.cfg.ttt.momentum, groups)
        q, k, v = mixer.qkv(x).chunk(3, dim=-1)
        entering = state if state is not None else mixer.initial_state(x.shape[0])
        inputs = mixer.ttt_inputs(x, q, k, v, position_offset)
        ttt_out, final = mixer.ttt_scan(inputs, entering)
        if ring and groups.sp_rank < groups.sp - 1:  # before the halo: messages to a neighbour keep one order
            ttt_out = send_state(ttt_out, final, groups)
        attention = halo_window_attention(mixer, q, k, v, position_offset, self.context) if mixer.attn_heads else None
        return mixer.combine(ttt_out, attention, x.dtype, inputs.output_scale), final


def split_mixers(model: nn.Module, context: SliceContext) -> int:
    """Wrap every TTTMixer of `model` for sequence parallelism; returns how many were wrapped."""
    mixers = [module for module in model.modules() if isinstance(module, TTTMixer)]
    for mixer in mixers:
        if mixer.cfg.ttt.mode == "parallel":
            mixer.chunk_scan = StateExchangeScan(mixer.chunk_scan, context.groups)
        mixer.forward = SlicedMixerForward(mixer, context)
    return len(mixers)
