"""The SwiGLU features and the W1 chunk scan as one differentiable step that keeps q and k, not h(q), h(k).

Run as two ops (`kernels.features.swiglu_features`, then `kernels.ttt_la.chunk_ttt_la`), autograd
keeps, per token and head, the features' inputs q and k (for their backward), their outputs h(q),
h(k) (the scan's inputs, for its backward) and, with `SAVE_PROJECTIONS`, the SwiGLU projections
(2 x 2 dh values): about 6 KB of a 125M layer's 17.6 KB per token that the same-size transformer's
block does not keep. `feature_chunk_scan` saves q, k, W0, W2 and what the scan saves besides its
inputs (the state each chunk read), and its backward runs the feature kernel again, projections
kept for that backward only, before the scan's and the features' backward kernels: two feature
kernels more per layer for about 6 x dh bytes less per token and head.

Only the Triton path is fused (the same ops, `tttla::swiglu_features` and `tttla::chunk_scan` with
their backward ops or their inlined registrations, called inside one autograd function); elsewhere (the reference, Muon, head dims
the kernels refuse) it is the two public ops one after the other.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from kernels.features import swiglu_features, swiglu_features_backward, swiglu_features_flat
from kernels.lact import ScanOptions
from kernels.triton_utils import SUPPORTED_DTYPES, use_triton
from kernels.ttt_la import chunk_scan, chunk_scan_gradients, chunk_ttt_la, kernel_head_dim, scan_input_dtypes


def feature_chunk_scan(
    q: torch.Tensor, k: torch.Tensor, w0: torch.Tensor, w2: torch.Tensor, v: torch.Tensor, eta1: torch.Tensor,
    initial_state: Optional[torch.Tensor], options: ScanOptions, *, beta: Optional[torch.Tensor] = None,
    initial_momentum: Optional[torch.Tensor] = None, allow_triton: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`chunk_ttt_la(swiglu_features(q), swiglu_features(k), v, ...)` with the features recomputed in the
    backward. q, k: [B, T, H, d]; w0, w2: [H, dh, d]; the rest as `chunk_ttt_la` takes them (no
    packed documents). Returns o [B, T, H, d], the final state and the final momentum (None without beta)."""
    if not fusable(q, k, w0, v, options, allow_triton):
        hq = swiglu_features(q, w0, w2, allow_triton=allow_triton)
        hk = swiglu_features(k, w0, w2, allow_triton=allow_triton)
        return chunk_ttt_la(hq, hk, v, eta1, initial_state, options, beta=beta, initial_momentum=initial_momentum,
                            allow_triton=allow_triton)  # fmt: skip
    batch, seq_len, heads, d = q.shape
    flat = lambda x: x.reshape(batch * seq_len, heads, -1)  # noqa: E731
    o, final, final_momentum = FeatureChunkScan.apply(
        flat(q), flat(k), w0, w2, flat(v), eta1.reshape(batch * seq_len, heads), initial_state,
        None if beta is None else beta.reshape(-1, heads), initial_momentum, batch, options.chunk_size,
        options.token_causal, float(options.update_sign))
    return o.reshape(batch, seq_len, heads, v.shape[-1]), final, final_momentum if beta is not None else None


def fusable(q: torch.Tensor, k: torch.Tensor, w0: torch.Tensor, v: torch.Tensor, options: ScanOptions,
            allow_triton: bool) -> bool:  # fmt: skip
    """Whether both ops would take their Triton kernels (the fused step calls those alone)."""
    dims_ok = kernel_head_dim(w0.shape[1]) and kernel_head_dim(v.shape[-1])
    same_dtype = q.dtype in SUPPORTED_DTYPES and k.dtype == v.dtype == q.dtype
    return use_triton(q, allow_triton) and not options.muon and dims_ok and same_dtype


class FeatureChunkScan(torch.autograd.Function):
    """Flat token axis [TT, H, *], as the ops take it; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, q, k, w0, w2, v, eta, initial_state, beta, initial_momentum, rows: int, chunk_size: int,
                token_causal: bool, sign: float):  # fmt: skip
        hq, _ = swiglu_features_flat(q, w0, w2, False)
        hk, _ = swiglu_features_flat(k, w0, w2, False)
        o, final, final_momentum, states, momenta = chunk_scan(
            hq, hk, v, eta, initial_state, beta, initial_momentum, None, rows, chunk_size, token_causal, sign)
        ctx.save_for_backward(q, k, w0, w2, v, eta, states, momenta if beta is not None else None, beta)
        ctx.config = (rows, chunk_size, token_causal, sign)
        ctx.input_dtypes = scan_input_dtypes(eta, initial_state, beta, initial_momentum)
        ctx.set_materialize_grads(False)
        return o, final, final_momentum

    @staticmethod
    def backward(ctx: Any, do, dfinal, dfinal_momentum):
        q, k, w0, w2, v, eta, states, momenta, beta = ctx.saved_tensors
        hq, projections_q = swiglu_features_flat(q, w0, w2, True)
        hk, projections_k = swiglu_features_flat(k, w0, w2, True)
        dhq, dhk, *scan_grads = chunk_scan_gradients(do, dfinal, dfinal_momentum, hq, hk, v, eta, states, momenta, beta,
                                                     None, ctx.config, ctx.input_dtypes)  # fmt: skip
        weight_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dq, dw02_q = swiglu_features_backward(dhq, q, w0, w2, projections_q, True, weight_grad)
        dk, dw02_k = swiglu_features_backward(dhk, k, w0, w2, projections_k, True, weight_grad)
        dw0 = dw2 = None
        if weight_grad:
            dw0, dw2 = (dw02_q + dw02_k).chunk(2, dim=1)
        # scan_grads: dv, deta, dinit, dbeta, dinit_momentum, in the order of the forward's inputs
        return (dq, dk, dw0, dw2, *scan_grads, None, None, None, None)
