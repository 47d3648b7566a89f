"""The fast-weight branch's computation: the mode's chunk form as plain functions, one way down.

The mixer (`model.ttt_layer.TTTMixer`) computes the per-token `TTTInputs` and the `ScanWeights` (its
TTT options and learned weights), hands both to its scan strategy, and combines what comes back.
The strategy (`model.ttt_layer.LocalScan`; sequence parallelism and decoding bring others) calls the
functions below, which run the mode's maths and return; nothing here calls back into the mixer:

* `fast_weight_scan`: one batch of rows from the state they enter with: `ttt.mode="recurrent"` runs
  `lact_scan` (the LaCT chunk loop, `kernels.lact.lact_recurrent`), `"linear_attention"` runs
  `linear_attention_scan` (features, then the W1 chunk scan);
* `document_scan`: documents packed on the rows, each from the learned initial state with its own
  chunks;
* `chunk_step`, `newton_schulz`: the options of a chunk's step, for a caller that sums a chunk's
  gradient itself (decoding).

The one piece a strategy may replace is the W1 chunk scan (`ChunkScan`: `kernels.ttt_la.chunk_ttt_la`'s
arguments, options in one `kernels.lact.ScanOptions`, and results); across sp ranks the state exchange wraps the local one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Optional

import torch

from kernels.fast_weights import FastWeights
from kernels.feature_scan import feature_chunk_scan
from kernels.features import swiglu_features as swiglu_features_op
from kernels.lact import (
    ChunkStep,
    NewtonSchulz,
    ScanOptions,
    chunk_mean,
    lact_recurrent,
    row_norms_of,
    scan_documents,
    swiglu_features,
)
from kernels.ttt_la import chunk_ttt_la
from model.config import TTTConfig
from model.layers import compute_dtype
from model.segments import DocumentSegments

ChunkScan = Callable[..., tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]
FeatureMap = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TTTInputs:
    """What the fast-weight branch reads per token (the chunk form consumes them all at once)."""

    q: torch.Tensor  # [B, T, H, d], SiLU then L2-normalised
    k: torch.Tensor  # [B, T, H, d], SiLU then L2-normalised
    v: torch.Tensor  # [B, T, H, d], SiLU
    etas: torch.Tensor  # [B, T, 3, H] learning rates eta0, eta1, eta2 (fp32; fp64 in the proofs)
    momentum_gate: Optional[torch.Tensor]  # [B, T, H] sigmoid; a chunk's momentum decay is its mean (None: off)
    output_scale: Optional[torch.Tensor] = None  # [B, T, H] silu(ttt_scale_proj(x)) (None: off)


@dataclass(frozen=True)
class ScanWeights:
    """What the chunk form reads besides the per-token inputs: one mixer's TTT options and learned weights."""

    ttt: TTTConfig
    features: FeatureMap  # h(x, w0, w2): `swiglu_features` or `identity_features`
    feature_weights: tuple[torch.Tensor, torch.Tensor]  # learned W0, W2 [H, dh, d] (dense; [H, 0, d] without)
    initial: FastWeights  # the learned initial fast weights [1, H, *, *] (fp32; fp64 in the proofs)
    operand: torch.Tensor  # a tensor of the model's activations' device and dtype (`operand_dtype` reads it)

    def initial_state(self, batch: int) -> FastWeights:
        """The learned initial fast weights, one (expanded) copy per sequence: [B, H, *, *]."""
        return self.initial.map(lambda w: w.expand(batch, -1, -1, -1))


def operand_dtype(x: torch.Tensor, state_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scan's operands (features, values, learning rates): the state dtype on CPU,
    where the reference runs; on GPUs the autocast dtype when autocast is on, else the activations'
    dtype. One dtype for all operands, because the kernel multiplies them together in tiles."""
    if x.device.type == "cpu":
        return state_dtype
    return compute_dtype(x)


def local_w1_chunk_scan(ttt: TTTConfig) -> ChunkScan:
    """The W1 chunk scan of one process: the public op `kernels.ttt_la.chunk_ttt_la`, which picks the
    Triton kernels or the reference (`model.ttt.use_kernel` allows the kernels)."""
    return partial(chunk_ttt_la, allow_triton=ttt.use_kernel)


def newton_schulz(ttt: TTTConfig, x: torch.Tensor, state_dtype: torch.dtype) -> Optional[NewtonSchulz]:
    """Muon's map (None when off): the configured schedule, iterating in the operand dtype of x."""
    return NewtonSchulz(ttt.ns_coefficients, operand_dtype(x, state_dtype)) if ttt.muon else None


def chunk_step(weights: ScanWeights, state_dtype: torch.dtype) -> ChunkStep:
    """How a chunk's summed gradient becomes its step (`kernels.lact.apply_chunk_gradients`), with the
    options the chunk form runs: Muon iterating in the operand dtype of the model's activations, the
    update sign, weight norm toward the learned initial weights' rows. For a caller that sums the
    gradient itself, token by token (decoding)."""
    ttt = weights.ttt
    row_norms = row_norms_of(weights.initial) if ttt.weight_norm else None
    return ChunkStep(newton_schulz(ttt, weights.operand, state_dtype), ttt.update_sign, row_norms, ttt.weight_norm_eps)


def fast_weight_scan(
    weights: ScanWeights, inputs: TTTInputs, entering: FastWeights, w1_chunk_scan: ChunkScan
) -> tuple[torch.Tensor, FastWeights]:
    """The mode's chunk form over `inputs` from the state `entering` ([B, H, *, *]): ([B, T, H, d]
    output, final state). `w1_chunk_scan` runs the linear-attention form's W1 scan."""
    ttt = weights.ttt
    eta0, eta1, eta2 = inputs.etas.unbind(dim=2)  # [B, T, H] each
    beta = None if inputs.momentum_gate is None else chunk_mean(inputs.momentum_gate, ttt.chunk_size)  # [B, N, H]
    if ttt.mode == "recurrent":
        return lact_scan(weights, inputs.q, inputs.k, inputs.v, eta0, eta1, eta2, beta, entering)
    return linear_attention_scan(weights, inputs.q, inputs.k, inputs.v, eta1, beta, entering, w1_chunk_scan)


def lact_scan(weights: ScanWeights, q, k, v, eta0, eta1, eta2, beta, entering: FastWeights) -> tuple[torch.Tensor, FastWeights]:
    """The LaCT chunk loop in the state dtype, autocast off: q, k, v [B, T, H, d], eta* [B, T, H],
    beta [B, N, H] or None -> ([B, T, H, d], final state)."""
    ttt = weights.ttt
    dtype = entering.w1.dtype
    muon = newton_schulz(ttt, q, dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return lact_recurrent(
            q.to(dtype), k.to(dtype), v.to(dtype), eta0.to(dtype), eta1.to(dtype), eta2.to(dtype),
            entering, ttt.chunk_size, beta=None if beta is None else beta.to(dtype), muon=muon,
            weight_norm=ttt.weight_norm, weight_norm_eps=ttt.weight_norm_eps, row_norms=weights.initial,
            fast_weights=ttt.fast_weights, update_sign=ttt.update_sign, features=weights.features,
        )  # fmt: skip


def linear_attention_scan(
    weights: ScanWeights, q, k, v, eta1, beta, entering: FastWeights, w1_chunk_scan: ChunkScan,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, FastWeights]:
    """Features with the (frozen) W0/W2, then the W1 chunk scan (over packed documents when
    `cu_seqlens` is given). Momentum is kept in the recurrent form's sign convention (gradient units)
    in the returned state so the two modes share states."""
    ttt = weights.ttt
    feature_dtype = operand_dtype(q, entering.w1.dtype)
    w0, w2 = (w.to(feature_dtype) for w in weights.feature_weights)
    initial_momentum = None if entering.m1 is None else -entering.m1
    options = ScanOptions(ttt.chunk_size, newton_schulz(ttt, q, entering.w1.dtype), ttt.token_causal, ttt.update_sign)
    if recomputes_features(weights, w1_chunk_scan, cu_seqlens):
        with torch.autocast(device_type=q.device.type, enabled=False):
            out, final_w1, final_momentum = feature_chunk_scan(
                q.to(feature_dtype), k.to(feature_dtype), w0, w2, v.to(feature_dtype), eta1.to(feature_dtype),
                entering.w1, options, beta=beta, initial_momentum=initial_momentum, allow_triton=ttt.use_kernel)
        return out, replace(entering, w1=final_w1, m1=None if final_momentum is None else -final_momentum)
    with torch.autocast(device_type=q.device.type, enabled=False):
        hq = linear_attention_features(weights, q.to(feature_dtype), w0, w2)
        hk = linear_attention_features(weights, k.to(feature_dtype), w0, w2)
    tensors = dict(beta=beta, initial_momentum=initial_momentum)
    if cu_seqlens is not None:
        tensors["cu_seqlens"] = cu_seqlens
    operands = (hq, hk, v.to(feature_dtype), eta1.to(feature_dtype), entering.w1, options)
    out, final_w1, final_momentum = w1_chunk_scan(*operands, **tensors)
    return out, replace(entering, w1=final_w1, m1=None if final_momentum is None else -final_momentum)


def recomputes_features(weights: ScanWeights, w1_chunk_scan: ChunkScan, cu_seqlens: Optional[torch.Tensor]) -> bool:
    """`model.ttt.recompute_features` applies: SwiGLU features and this process's own scan (a strategy
    that replaces the scan, as sequence parallelism does, takes the features as computed) over
    unpacked rows."""
    local = getattr(w1_chunk_scan, "func", None) is chunk_ttt_la
    return weights.ttt.recompute_features and weights.features is swiglu_features and local and cu_seqlens is None


def linear_attention_features(weights: ScanWeights, x: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """h(x) of the linear-attention form, [B, T, H, d] -> [B, T, H, dh] with w0, w2 [H, dh, d]: SwiGLU
    through its public op (`kernels.features.swiglu_features`), or the identity map."""
    if weights.features is swiglu_features:
        return swiglu_features_op(x, w0, w2, allow_triton=weights.ttt.use_kernel,
                                  save_projections=weights.ttt.save_feature_projections)
    return weights.features(x, w0, w2)


def document_scan(weights: ScanWeights, inputs: TTTInputs, segments: DocumentSegments) -> tuple[torch.Tensor, FastWeights]:
    """The fast-weight branch over packed documents: every document runs from the learned initial
    state with its own chunks (the rows laid end to end, as the kernels take `cu_seqlens`).
    Returns [B, T, H, d] and, per row, the state its last document ended with."""
    ttt = weights.ttt
    packed = TTTInputs(*(segments.pack(t) for t in (inputs.q, inputs.k, inputs.v, inputs.etas)),
                       None if inputs.momentum_gate is None else segments.pack(inputs.momentum_gate))  # fmt: skip
    beta = None
    if packed.momentum_gate is not None:  # [1, NC, H]: each document's chunks counted from its start
        beta = torch.cat([chunk_mean(packed.momentum_gate[:, s:e], ttt.chunk_size) for s, e in segments.bounds()],
                         dim=1)  # fmt: skip
    eta0, eta1, eta2 = packed.etas.unbind(dim=2)
    entering = weights.initial_state(segments.num_documents)
    if ttt.mode == "recurrent":
        per_token = (packed.q, packed.k, packed.v, eta0, eta1, eta2)

        def scan_document(i: int, tokens: slice, doc_beta: Optional[torch.Tensor]):
            return lact_scan(weights, *(t[:, tokens] for t in per_token), doc_beta, entering.select(i))

        outputs, finals = zip(*scan_documents(scan_document, segments.cu_seqlens, ttt.chunk_size, beta))
        out, final = torch.cat(outputs, dim=1), FastWeights.concat(finals)
    else:
        out, final = linear_attention_scan(weights, packed.q, packed.k, packed.v, eta1, beta, entering,
                                           local_w1_chunk_scan(ttt), segments.cu_seqlens)  # fmt: skip
    return segments.unpack(out), final.select(segments.last_document)

