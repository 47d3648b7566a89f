"""The sequence mixer of every block: a LaCT fast-weight (TTT) branch plus sliding-window attention.

Both branches read one shared q/k/v projection, as in LaCT: the attention branch splits it into
`num_attn_heads` RoPE heads; the TTT branch into `ttt.num_heads` heads of d = hidden / heads, with
(optionally) a per-channel affine map on q/k, SiLU on q/k/v, L2-normalised q/k and (optionally) the
attention branch's RoPE on the TTT q/k; its per-head normed output is (optionally) gated by
silu(ttt_scale_proj(x)). `model.config.TTTConfig` says which option is the released layer's. Per head the TTT branch holds the fast-weight MLP
f(x) = W1 (silu(W0 x) * (W2 x)) whose initial weights are learned parameters, and per token it
predicts three learning rates (softplus, "mamba" parameterisation) and, with momentum, a
coefficient whose chunk mean is the momentum decay.

`ttt.mode` picks the computation (`model.fast_weight_scan`, plain functions of the inputs, the
learned weights and the entering state):
* `recurrent`: the faithful LaCT loop (any fast-weight set, momentum, Muon, weight norm);
* `linear_attention`: W1 only, no weight norm, as a chunk scan (block-causal linear attention with
  feature map h(x) = silu(W0 x) * (W2 x)); `token_causal` adds the intra-chunk term.

The layer accepts the fast-weight state a sequence enters with and returns the state it leaves
with, so a caller can continue a sequence (decoding, or a sequence split across ranks) without
the layer knowing why. How it continues one is a pair of strategies (`TTTMixer.set_strategies`):
the scan (`LocalScan`: how the fast-weight branch runs over the rows from the state they enter with)
and the window attention (`LocalWindow`). The mixer computes the scan's inputs (`ttt_inputs`) and
weights (`scan_weights`), calls its scan strategy once, and combines; the strategy runs the
functions of `model.fast_weight_scan` and never calls back into the mixer. The local ones are the
default; sequence parallelism (parallel/sliced_mixer.py) plugs in a state exchange (it replaces
only the W1 chunk scan) or a ring and a halo exchange, decoding (decoding/decode.py) a chunk's
gradient summed token by token and a ring buffer of keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.fast_weights import FastWeights
from kernels.lact import identity_features, swiglu_features
from model.config import LMConfig, TTTConfig
from model.fast_weight_scan import (
    ChunkScan,
    ScanWeights,
    TTTInputs,
    document_scan,
    fast_weight_scan,
    local_w1_chunk_scan,
)
from model.layers import RMSNorm, RotaryTables, apply_rotary, rotary_tables
from model.low_rank import LowRankFastWeight
from model.segments import DocumentSegments
from model.swa import sliding_window_attention


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y: the bias that makes an untrained learning-rate head output y."""
    return y + math.log(-math.expm1(-y))


def token_positions(
    position_offset: Union[int, torch.Tensor], seq_len: int, segments: Optional[DocumentSegments] = None
) -> Optional[torch.Tensor]:
    """The absolute positions [B, T] of the rows' tokens where rows differ: packed documents restart
    theirs, and a [B] `position_offset` starts each row at its own position (static decoding). None
    when every row runs from the same int position_offset (its tokens sit at position_offset + t)."""
    if segments is not None:
        return segments.positions
    if isinstance(position_offset, torch.Tensor):
        return position_offset[:, None] + torch.arange(seq_len, device=position_offset.device)
    return None


@dataclass
class RowPositions:
    """Where the rows of one mixer call sit in their sequences, as the strategies read it."""

    offset: Union[int, torch.Tensor]  # absolute position of each row's first token: an int for all rows, or [B]
    segments: Optional[DocumentSegments] = None  # packed documents: positions restart, nothing crosses a document
    rope: Optional[RotaryTables] = None  # the rows' RoPE tables where the LM built them for all layers


class LocalScan:
    """The scan strategy of a mixer: how its fast-weight branch runs over the rows it is given.

    This one, the default, runs the mode's chunk form over the whole rows, from the state they enter
    with. Others replace one of its two methods: a ring across sp ranks or a token-by-token decoder
    replace `__call__`; the state exchange across sp ranks replaces `w1_chunk_scan`, the
    linear-attention form's W1 scan (the state entering a slice enters that scan linearly).
    """

    def __call__(
        self, weights: ScanWeights, x: torch.Tensor, inputs: TTTInputs, state: Optional[FastWeights], rows: RowPositions
    ) -> tuple[torch.Tensor, FastWeights]:
        """x [B, T, D] (the mixer's input) and its per-token `inputs` from `state` (None: the learned
        initial fast weights; with packed documents, every document starts from those) ->
        ([B, T, H, d] output, the state after the rows)."""
        if rows.segments is not None:
            return document_scan(weights, inputs, rows.segments)
        entering = state if state is not None else weights.initial_state(x.shape[0])
        return fast_weight_scan(weights, inputs, entering, self.w1_chunk_scan(weights.ttt))

    def w1_chunk_scan(self, ttt: TTTConfig) -> ChunkScan:
        """The linear-attention form's W1 chunk scan: here the local one."""
        return local_w1_chunk_scan(ttt)


class LocalWindow:
    """The window-attention strategy of a mixer: how its sliding-window branch attends.

    This one, the default, attends within the rows it is given (`TTTMixer.attention_branch`), and
    reads the block mask the LM builds once per forward for all layers (`reads_window_mask`).
    Strategies that attend over other keys (a halo from the previous sp rank, a decoder's ring
    buffer) set `reads_window_mask = False`, and the LM builds none for them.
    """

    reads_window_mask = True

    def __call__(
        self, mixer: TTTMixer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: RowPositions, window_mask: Any
    ) -> torch.Tensor:
        """[B, T, D] projections of the rows -> [B, T, D] attention output."""
        return mixer.attention_branch(q, k, v, rows.offset, rows.segments, window_mask, rows.rope)


def l2_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / (|x| + eps) over the last dim, as the released LaCT code normalises the TTT q/k."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


class TTTMixer(nn.Module):
    """x [B, T, D] -> y [B, T, D]: TTT-as-linear-attention branch + sliding-window attention branch.

    `scan` and `window` are the two strategies (module docstring), plain attributes without
    parameters: the state dict is the same whichever are set.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        ttt = cfg.ttt
        self.cfg = cfg
        self.num_heads = ttt.num_heads
        self.head_dim = ttt.resolved_head_dim(cfg.hidden_size)  # d
        self.inner_dim = ttt.resolved_inner_dim(cfg.hidden_size)  # dh
        hidden, heads = cfg.hidden_size, ttt.num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        if ttt.per_token_lr:  # rows h * 3 + i: head h's rate for W_i, the released layout
            self.lr_proj = nn.Linear(hidden, 3 * heads, bias=True)
        else:
            self.lr_proj = None
            self.lr_bias = nn.Parameter(torch.empty(3 * heads))
        self.momentum_proj = nn.Linear(hidden, heads, bias=True) if ttt.momentum else None
        if ttt.qk_affine:  # column 0 acts on q, column 1 on k
            self.qk_scale = nn.Parameter(torch.ones(hidden, 2))
            self.qk_offset = nn.Parameter(torch.zeros(hidden, 2))
        self.ttt_scale_proj = nn.Linear(hidden, heads, bias=True) if ttt.output_scale else None
        feature_shape = (heads, self.inner_dim, self.head_dim)
        self.w0 = self.w2 = None
        if ttt.feature_map == "swiglu" and ttt.w02_rank > 0:
            self.w0, self.w2 = (LowRankFastWeight(*feature_shape, ttt.w02_rank, ttt.low_rank_init_gain) for _ in range(2))
        elif ttt.feature_map == "swiglu":
            self.w0, self.w2 = (nn.Parameter(torch.empty(feature_shape)) for _ in range(2))
        self.w1 = nn.Parameter(torch.empty(heads, self.head_dim, self.inner_dim))
        self.features = swiglu_features if ttt.feature_map == "swiglu" else identity_features
        self.ttt_norm = RMSNorm(self.head_dim, ttt.output_norm_eps)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.attn_heads = cfg.num_attn_heads if cfg.window_size > 0 else 0
        self.scan = LocalScan()
        self.window = LocalWindow()
        # The mean per-token learning rates (eta0, eta1, eta2) of the last forward, written only while
        # `records_learning_rates` is set (the trainer's probe, `train.monitor`). A buffer, not a Python
        # attribute, so a compiled block writes it inside its one graph (every layer shares the graph and
        # the flag's value, so nothing recompiles per layer); not persistent: the state dict is unchanged.
        self.records_learning_rates = False
        self.register_buffer("mean_learning_rates", torch.zeros(3), persistent=False)
        self.reset_ttt_parameters()

    def set_strategies(self, scan: Optional[LocalScan] = None, window: Optional[LocalWindow] = None) -> None:
        """How the layer runs its fast-weight branch and attends from the next call on (None keeps the
        current one). Sequence parallelism sets them once when it wraps a model, decoding for one prefill
        or step. Set them between calls, never during one: a compiled layer guards on them and on the
        Python values they read, so what a strategy reads must stay fixed across the calls one graph
        serves (decoding's changes every token, so decoding calls the blocks eagerly)."""
        if scan is not None:
            self.scan = scan
        if window is not None:
            self.window = window

    def reset_ttt_parameters(self) -> None:
        """The fast weights' initial values and the learning-rate bias (softplus(bias) = base_lr); called
        after the LM's generic init, which draws every linear layer (lr, momentum and output-scale heads
        included) from normal(0, model.init_std), as the released code does."""
        ttt = self.cfg.ttt
        bias = self.lr_bias if self.lr_proj is None else self.lr_proj.bias
        nn.init.constant_(bias, inverse_softplus(ttt.base_lr))
        nn.init.normal_(self.w1, std=ttt.init_gain / math.sqrt(self.inner_dim))
        for w in (self.w0, self.w2):
            if isinstance(w, LowRankFastWeight):
                w.reset_parameters()
            elif w is not None:
                nn.init.normal_(w, std=ttt.init_gain / math.sqrt(self.head_dim))

    def feature_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned W0, W2 as dense [H, dh, d] matrices (low-rank ones materialised; [H, 0, d] when
        the feature map has none, so states keep one layout)."""
        if self.w0 is None:
            empty = self.w1.new_zeros(self.num_heads, 0, self.head_dim)
            return empty, empty
        if isinstance(self.w0, LowRankFastWeight):
            return self.w0(), self.w2()
        return self.w0, self.w2

    def initial_state(self, batch: int) -> FastWeights:
        """The learned initial fast weights, one copy per sequence (fp32: states never run in bf16)."""
        return self._initial_state(*self.feature_weights(), batch)

    def _initial_state(self, w0: torch.Tensor, w2: torch.Tensor, batch: int) -> FastWeights:
        dtype = torch.float64 if self.w1.dtype == torch.float64 else torch.float32
        return FastWeights(*(w.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1) for w in (w0, self.w1, w2)))

    def scan_weights(self) -> ScanWeights:
        """What the scan reads besides the per-token inputs: the TTT options, the feature map, the learned
        W0/W2 and initial fast weights, and the activations' dtype (through the qkv weight). Low-rank
        W0/W2 are materialised once per call, for both."""
        w0, w2 = self.feature_weights()
        return ScanWeights(self.cfg.ttt, self.features, (w0, w2), self._initial_state(w0, w2, 1), self.qkv.weight)

    def forward(
        self,
        x: torch.Tensor,
        state: Optional[FastWeights] = None,
        position_offset: Union[int, torch.Tensor] = 0,
        segments: Optional[DocumentSegments] = None,
        window_mask: Optional[Any] = None,
        rope: Optional[RotaryTables] = None,
    ) -> tuple[torch.Tensor, FastWeights]:
        """x [B, T, D] -> y [B, T, D] and the fast weights after each row.

        position_offset: the absolute position of the rows' first token, an int for all rows or [B]
        per row. `segments` marks packed documents: each starts from the learned initial state and
        attends only within itself (a carried `state` cannot be combined with it). `window_mask` is
        the attention branch's block mask when the caller built one for all layers (`model.swa`), and
        `rope` the rows' RoPE tables likewise (None: the mixer builds its own).
        The fast-weight branch runs through `self.scan`, the attention through `self.window`.
        """
        if segments is not None and state is not None:
            raise ValueError("a carried fast-weight state and document segments exclude each other")
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        inputs = self.ttt_inputs(x, q, k, v, position_offset, token_positions(position_offset, x.shape[1], segments), rope)
        rows = RowPositions(position_offset, segments, rope)
        ttt_out, final_state = self.scan(self.scan_weights(), x, inputs, state, rows)
        attention = self.window(self, q, k, v, rows, window_mask) if self.attn_heads else None
        return self.combine(ttt_out, attention, x.dtype, inputs.output_scale), final_state

    def combine(
        self, ttt_out: torch.Tensor, attention: Optional[torch.Tensor], dtype: torch.dtype,
        output_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """o_proj(norm(TTT output) [* output_scale] + attention output): [B, T, H, d], [B, T, D] (or
        None) and [B, T, H] (or None) -> [B, T, D]."""
        batch, seq_len = ttt_out.shape[:2]
        mixed = self.gated_norm(ttt_out, output_scale).reshape(batch, seq_len, -1).to(dtype)
        if attention is not None:
            mixed = mixed + attention
        return self.o_proj(mixed)

    def gated_norm(self, ttt_out: torch.Tensor, output_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The TTT branch's head-normed output, gated by output_scale [B, T, H] when on: [B, T, H, d] -> [B, T, H, d]."""
        normed = self.ttt_norm(ttt_out)
        return normed if output_scale is None else normed * output_scale[..., None]

    def attention_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_offset: int,
        positions: Optional[torch.Tensor] = None, rope: Optional[RotaryTables] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, D] projections -> [B, T, A, D/A] heads, q and k rotated to their absolute positions
        (decoding caches the rotated keys, so it needs this step on its own); `positions` [B, T]
        replaces position_offset + t where packed documents restart their positions, and `rope`, the
        tables of those positions, replaces both."""
        batch, seq_len, hidden = q.shape
        heads = self.attn_heads
        q, k, v = (t.reshape(batch, seq_len, heads, hidden // heads) for t in (q, k, v))
        q, k = self.rotate(q, k, position_offset, positions, rope)
        return q, k, v

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, position_offset: int, positions: Optional[torch.Tensor] = None,
        rope: Optional[RotaryTables] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on [B, T, A, Dh] heads at positions position_offset + t (or `positions` [B, T]), theta
        `model.rope_theta`, from `rope` where given, else from tables built here; in the heads' dtype."""
        if rope is not None:
            cos, sin = rope.to(q.dtype)
        else:
            if positions is None:
                positions = torch.arange(position_offset, position_offset + q.shape[1], device=q.device)
            cos, sin = rotary_tables(positions, q.shape[-1], self.cfg.rope_theta, q.dtype)
        layout = self.cfg.rope_layout
        return apply_rotary(q, cos, sin, layout), apply_rotary(k, cos, sin, layout)

    def attention_branch(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_offset: Union[int, torch.Tensor],
        segments: Optional[DocumentSegments] = None, window_mask: Optional[Any] = None,
        rope: Optional[RotaryTables] = None,
    ) -> torch.Tensor:
        """Sliding-window attention of the rows within themselves over [B, T, D] projections -> [B, T, D]
        (the local window strategy); with packed documents, positions restart and attention stays
        inside each document."""
        batch, seq_len, hidden = q.shape
        heads = self.attention_heads(q, k, v, position_offset, token_positions(position_offset, seq_len, segments), rope)
        doc_ids = None if segments is None else segments.doc_ids
        out = sliding_window_attention(*heads, self.cfg.window_size, doc_ids=doc_ids, block_mask=window_mask,
                                       kernel=self.cfg.window_kernel)
        return out.reshape(batch, seq_len, hidden)

    def ttt_inputs(
        self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_offset: int = 0,
        positions: Optional[torch.Tensor] = None, rope: Optional[RotaryTables] = None,
    ) -> TTTInputs:
        """The per-token inputs of the fast-weight branch from x [B, T, D] and its q/k/v projections at
        positions position_offset + t (or `positions` [B, T], restarting per packed document; `rope`:
        their RoPE tables, where the LM built them).

        Separate from the scan: the scan strategy receives them, and a decoder adds each token's
        inputs to its partial chunk's running sums as they arrive.
        """
        ttt = self.cfg.ttt
        batch, seq_len = x.shape[:2]
        if ttt.recompute_inputs and torch.is_grad_enabled() and torch.compiler.is_compiling():
            # A checkpointed region inside a compiled graph: the partitioner recomputes its outputs in
            # the backward from q, k, v, which the graph keeps for the silu's own backward anyway.
            tq, tk, tv = checkpoint(self.branch_qkv, q, k, v, position_offset, positions, rope, use_reentrant=False)
        else:
            tq, tk, tv = self.branch_qkv(q, k, v, position_offset, positions, rope)
        state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        lr_logits, gate_logits, scale_logits = self.token_heads(x)
        if lr_logits is not None:
            logits = lr_logits.to(state_dtype).reshape(batch, seq_len, self.num_heads, 3)
        else:
            logits = self.lr_bias.to(state_dtype).reshape(self.num_heads, 3).expand(batch, seq_len, -1, -1)
        # [B, T, 3, H]; softplus runs on a contiguous tensor: on a transposed view its backward's output
        # strides differ between traced and eager runs, which breaks the compiled backward (a view error).
        etas = F.softplus(logits.transpose(2, 3).contiguous())
        if self.records_learning_rates:
            with torch.no_grad():
                self.mean_learning_rates.copy_(etas.detach().mean(dim=(0, 1, 3)))
        gate = torch.sigmoid(gate_logits.to(state_dtype)) if gate_logits is not None else None
        scale = F.silu(scale_logits) if scale_logits is not None else None
        return TTTInputs(tq, tk, tv, etas, gate, scale)

    def branch_qkv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_offset: Union[int, torch.Tensor] = 0,
        positions: Optional[torch.Tensor] = None, rope: Optional[RotaryTables] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fast-weight branch's q, k, v heads [B, T, H, d] from the [B, T, D] projections: the affine
        (when on), silu, q and k l2-normalised and rotated (when `ttt.rope`). Elementwise work over
        tensors the block keeps anyway, so `ttt.recompute_inputs` can recompute it instead of keeping
        three more [B, T, D] tensors for the backward."""
        ttt = self.cfg.ttt
        batch, seq_len, hidden = q.shape
        if ttt.qk_affine:
            q = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]
            k = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        tq, tk, tv = (F.silu(t).reshape(shape) for t in (q, k, v))
        tq, tk = l2_normalise(tq, ttt.l2_eps), l2_normalise(tk, ttt.l2_eps)
        if ttt.rope:  # the attention branch's RoPE over blocks of its head dim, as released
            blocks = (batch, seq_len, self.cfg.num_attn_heads, hidden // self.cfg.num_attn_heads)
            tq, tk = self.rotate(tq.reshape(blocks), tk.reshape(blocks), position_offset, positions, rope)
            tq, tk = tq.reshape(shape), tk.reshape(shape)
        return tq, tk, tv

    def token_heads(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """The small per-token heads of x [B, T, D]: learning-rate, momentum and output-scale logits
        ([B, T, 3H], [B, T, H], [B, T, H]; None where off), as one matrix product over their stacked
        weights. Three tiny linear layers cost three launches each where a token is decoded (a split-K
        product, its reduction, a bias epilogue); one product without bias costs one or two, and the
        biases join the elementwise work that follows. Each logit keeps the product's dtype."""
        layers = (self.lr_proj, self.momentum_proj, self.ttt_scale_proj)
        present = [layer for layer in layers if layer is not None]
        if not present:
            return None, None, None
        weight = torch.cat([layer.weight for layer in present]) if len(present) > 1 else present[0].weight
        products = iter(F.linear(x, weight).split([layer.out_features for layer in present], dim=-1))
        logits = []
        for layer in layers:
            if layer is not None:
                product = next(products)
                logits.append((product + layer.bias).to(product.dtype))
            else:
                logits.append(None)
        return tuple(logits)
